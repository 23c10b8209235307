"""loraplex control plane: tenant ids, config, adapter validation, the adapter store and the
Redis-backed tenant registry, plus the `tenantctl` CLI.

Modules, one job each (import what you need directly; this package imports nothing eagerly):
  config      LoraplexConfig, the one config object of the project
  errors      typed errors (no HTTP codes)
  ids         tenant id / adapter id validation
  schema      TenantRecord
  validate    BaseModelSpec, validate_adapter
  store       AdapterStore (path_for / verify for workers)
  registry    TenantRegistry (Redis records, events, subscribe)
  onboarding  onboard()
  cli         tenantctl

Never imports handler/ or TorchServe; never unpickles tenant files.
"""
