"""What the control plane (`tenant_registry/`) and the worker (`handler/`, `handler/engine/`)
must agree on, in one place both may import: the adapter format (`adapter_format`) and the
one typed configuration (`config`).

Why a package of its own: the engine imports nothing from `tenant_registry/`, and
`tenant_registry/` imports nothing from `handler/`; a rule both sides apply (which adapters are
accepted, which settings exist) can live in neither. This package imports none of them.
"""
