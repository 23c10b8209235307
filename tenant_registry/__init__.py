"""loraplex control plane: tenant ids, config, adapter validation, the adapter store and the
Redis-backed tenant registry, plus the `tenantctl` CLI.

Modules, one job each (import what you need directly; this package imports nothing eagerly):
  config      LoraplexConfig, the one config object of the project
  errors      typed errors (no HTTP codes)
  ids         tenant id / adapter id validation
  schema      TenantRecord
  validate    BaseModelSpec, validate_adapter
  store       AdapterStore (read for workers: the adapter bytes, sha256-checked)
  keys        per-tenant keys: generate_key, KeyDigest, digest_key, verify_key
  registry    TenantRegistry (Redis records, key digests, events, subscribe)
  onboarding  onboard(), ensure_key(), rotate_key()
  backup      export_registry / import_registry (whole registry as one JSON document)
  cli         tenantctl

Never imports handler/ or TorchServe; never unpickles tenant files.
"""
