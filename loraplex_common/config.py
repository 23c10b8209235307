"""LoraplexConfig: the one configuration of loraplex. The worker (handler/), the engine's settings
(built from it in handler/service.py) and `tenantctl` all read this object; nothing else reads a
`LORAPLEX_*` variable.

Sources, lowest to highest precedence:
  1. the defaults below;
  2. the `handler:` section of TorchServe's model-config.yaml;
  3. environment variables `LORAPLEX_<KEY UPPER>` (e.g. LORAPLEX_REDIS_URL; `env_name(key)`);
  4. `overrides` passed by the caller (tenantctl's flags).

Why strict: an unknown key in the `handler:` section (a typo such as `num_slot`) and an unknown
`LORAPLEX_*` variable (`LORAPLEX_NUM_SLOT`) are errors naming the key and the closest known one,
not silently ignored settings. The few `LORAPLEX_*` variables that are not settings are listed
once, in NON_SETTING_ENV. Values from env are strings, parsed by the same typed parsers as YAML
values. Every error is a ConfigError whose `key` is the bad key.

Slots, the one capacity: every pool has `num_slots` slots; slot 0 is the base model (all zeros),
SPARE_SLOTS slot is kept free so a new adapter loads before an old one is evicted, and the rest
(`resident_adapters = num_slots - 1 - SPARE_SLOTS`) hold the worker's resident adapters.

Relative paths (PATH_KEYS) read from a model-config file, and the defaults of a config loaded from
one, are resolved against that file's directory, so `tenantctl` run from anywhere with
`--model-config` writes where the workers read. Relative paths from env, flags or an already
parsed `handler_section` (inside a TorchServe worker, whose file's directory is unknown) are kept
as given: relative to the process's working directory.

Immutable once built; safe to share between threads.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .adapter_format import DEFAULT_TARGET_MODULES

ENV_PREFIX = "LORAPLEX_"
SPARE_SLOTS = 1        # the slot a new adapter is loaded into before an old one is evicted
MIN_SLOTS = 2 + SPARE_SLOTS  # slot 0 (base) + the spare + at least one resident adapter

# LORAPLEX_* variables that are not settings of this object (each read by the one tool named).
# Every other LORAPLEX_* variable must be a setting's env name, or the loader refuses it.
NON_SETTING_ENV: dict[str, str] = {
    "LORAPLEX_MODEL_CONFIG": "tenantctl: the model-config.yaml to read when --model-config is not given "
                             "(default ./model-config.yaml if it exists)",
    "LORAPLEX_TS_TOKEN": "tenantctl status: the TorchServe management token (a secret, so never a config key)",
    "LORAPLEX_CACHE": "make model / make adapters: where the converted base model and the demo adapters are "
                      "cached (default ~/.cache/loraplex)",
}
MODEL_CONFIG_FILE = "model-config.yaml"


class ConfigError(ValueError):
    """A configuration value is missing or malformed; `key` names it (None = the file itself)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class LoraplexConfig:
    """Every loraplex setting. The README's configuration table documents each (tests/test_config_readme.py)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "loraplex"
    adapter_store: str = "var/adapters"
    adapter_store_endpoint: str = ""    # S3-compatible endpoint for an s3:// adapter_store ("" = the client's default)
    base_model_dir: str = ""            # "" = the TorchServe model dir (tenantctl: <model_store>/<model_name>)
    base_model_name: str = ""           # identity adapters must name; "" = any name (shapes still checked)
    max_rank: int = 64
    max_adapter_bytes: int = 268435456
    num_slots: int = 10                 # per pool; slot 0 = base, SPARE_SLOTS spare, the rest resident adapters
    idle_ttl_s: float = 600.0
    unknown_tenant_policy: str = "base"     # base | reject
    unknown_task_policy: str = "reject"     # reject (404 naming the task) | default (the tenant's default task)
    load_failure_policy: str = "base"       # base | error
    require_tenant: bool = False
    require_tenant_key: bool = False        # requests must carry the tenant's key (X-Tenant-Key)
    max_new_tokens_cap: int = 256
    max_prompt_tokens: int = 2048
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                     # auto | float32 | bfloat16 | float16
    engine: str = "multilora"               # multilora | peft
    decode: str = "auto"                    # auto | generate | static | graphs (multilora engine)
    decode_graph_buckets: int = 8           # static KV caches + CUDA graphs kept per worker (LRU)
    lora_backend: str = "auto"              # auto | torch | triton (multilora engine's GPU LoRA path)
    triton_pdl: bool = True                 # Triton kernels may use programmatic dependent launch (Hopper+)
    cpu_gather_workspace_mb: int = 512      # CPU: memory kept for gathering mixed batches' adapters (0 = none)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    host_tier_mb: int = 2048                # worker's host-memory adapter tier under the device slots (0 = none)
    max_pinned_adapters: int = 4            # adapters `tenantctl pin` may keep resident per worker
    prefetch_top_n: int = 0                 # at worker start, load the N most used adapters
    prefetch_tenants: tuple[str, ...] = ()  # at worker start, load these tenants' current adapters
    metrics_max_adapters: int = 100         # adapters with their own metric labels per worker; later ones: "_other"
    epp_metrics_address: str = ""           # host:port of the worker's own endpoint for the LoRA gauge ("" = off)
    scheduler: str = "continuous"           # continuous (per-step, handler/scheduler.py) | static (batch to completion)
    kv_rows: int = 16                       # continuous: KV cache rows = requests running at once
    kv_max_len: int = 0                     # continuous: tokens one row holds (0 = max_prompt_tokens + max_new_tokens_cap)
    prefill_chunk: int = 512                # continuous: most prompt tokens prefilled in one step
    prefill_wait_steps: int = 8             # continuous, GPU graphs: joining rows wait up to this many steps to prefill together
    prefill_graphs: bool = True             # continuous, GPU graphs: prefill chunks replay captured graphs (False: eager)
    step_overlap: str = "auto"              # continuous: auto (on with GPU graphs) | on | off: a step's tokens read back while the next runs
    step_mixed: str = "off"                 # continuous: auto (on with GPU graphs) | on | off: small joining prompts ride in the decode step's forward
    mixed_prefill_tokens: int = 64          # continuous, step_mixed: prompt tokens one decode step carries at most
    graph_batch_sizes: tuple[int, ...] = () # continuous on a GPU: decode batch sizes captured at start (() = 1, 2, 4, ... kv_rows)
    max_waiting: int = 64                   # continuous: requests that may wait beyond the kv_rows running (then 503)
    retry_after_s: int = 1                  # the Retry-After of that 503
    tenant_max_running: int = 0             # continuous: most rows one tenant runs at once (0 = no cap)
    request_timeout_s: float = 300.0        # continuous: a request not finished this long after arrival gets 504 (0 = none)
    admission_max_wait_s: float = 5.0       # continuous: a waiting row's adapter goes before busier ones after this long (0 = never)
    drain_preempt_tokens: int = 0           # continuous: a drained adapter's greedy rows with more tokens to go are preempted (0 = never)
    negative_cache_s: float = 30.0
    registry_cache_s: float = 30.0          # max staleness of a worker's tenant cache when events are missed
    registry_stale_s: float = 300.0         # how long a worker may serve a cached tenant while Redis is unreachable
    management_url: str = "http://127.0.0.1:8081"
    model_name: str = "loraplex"
    model_store: str = "model_store"        # TorchServe's model store (tenantctl finds the workers' base model there)
    management_key_file: str = "var/torchserve/key_file.json"  # TorchServe's key file (tenantctl status)
    onboarding_address: str = "127.0.0.1:8083"  # host:port of the onboarding HTTP service (tenant_registry/http_api.py)
    quota_max_tasks: int = 8                # tasks one tenant may own (0 = no limit)
    quota_max_versions: int = 20            # versions kept per task; onboarding one more is refused (0 = no limit)
    quota_max_bytes: int = 2147483648       # adapter bytes one tenant may keep in the store, all versions (0 = no limit)
    task_router: str = "builtin"            # router of `router: classify` tenants: builtin | "package.module:callable"
    max_fanout_rows: int = 8                # rows one compare / fallback-chain request may run (handler/fanout.py)

    @property
    def kv_row_tokens(self) -> int:
        """Tokens one KV row holds (prompt + new tokens): `kv_max_len`, or when 0 the longest request
        the limits allow (max_prompt_tokens + max_new_tokens_cap)."""
        return self.kv_max_len or self.max_prompt_tokens + self.max_new_tokens_cap

    @property
    def resident_adapters(self) -> int:
        """Adapters a worker keeps loaded: num_slots - 1 (slot 0, the base) - SPARE_SLOTS."""
        return self.num_slots - 1 - SPARE_SLOTS

    # ------------------------------------------------------------------ building
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "LoraplexConfig":
        """Build from a plain mapping (e.g. a parsed `handler:` section). Unknown keys are errors."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"handler settings must be a mapping, got {type(data).__name__}")
        for k in data:
            if k not in _PARSERS:
                raise ConfigError(f"unknown config key {str(k)!r}{_did_you_mean(str(k), _PARSERS)}"
                                  f" (known keys: {', '.join(sorted(_PARSERS))})", key=str(k))
        values = {k: _PARSERS[k](k, v) for k, v in data.items()}
        return cls(**values)

    @classmethod
    def load(cls, model_config_path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
             env: Mapping[str, str] = os.environ, *,
             handler_section: Mapping[str, Any] | None = None) -> "LoraplexConfig":
        """Defaults < model-config.yaml `handler:` section < env LORAPLEX_* < overrides.

        The `handler:` section comes from the file at `model_config_path`, or, inside a TorchServe
        worker, already parsed as `handler_section=context.model_yaml_config.get("handler")` (pass it
        there, not as `overrides`, so env variables can still override the YAML).
        `overrides` entries whose value is None are ignored (so CLI flags that were not given can be
        passed through unconditionally). An unknown LORAPLEX_* variable in `env` is a ConfigError.
        """
        merged: dict[str, Any] = {}
        if model_config_path:
            path = Path(model_config_path)
            section = dict(_read_handler_section(path))
            base = path.resolve().parent
            for k in PATH_KEYS:  # the file's relative paths (and the defaults) are relative to the file
                v = section.get(k, getattr(cls, k))
                if (isinstance(v, (str, os.PathLike)) and os.fspath(v) and not os.path.isabs(v)
                        and "://" not in os.fspath(v)):  # a URI (s3://bucket/prefix) is no relative path
                    section[k] = str(base / v)
            merged.update(section)
        if handler_section is not None:
            if not isinstance(handler_section, Mapping):
                raise ConfigError("'handler' section must be a mapping", key="handler")
            merged.update(handler_section)
        merged.update(settings_from_env(env))
        for k, v in (overrides or {}).items():
            if v is not None:
                merged[k] = v
        return cls.from_mapping(merged)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["target_modules"] = list(self.target_modules)
        out["prefetch_tenants"] = list(self.prefetch_tenants)
        out["graph_batch_sizes"] = list(self.graph_batch_sizes)
        return out


PATH_KEYS = ("adapter_store", "base_model_dir", "model_store", "management_key_file")


def env_name(key: str) -> str:
    """The environment variable that overrides config key `key`."""
    return ENV_PREFIX + key.upper()


def settings_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The settings that `env` sets, by key (unparsed). An unknown LORAPLEX_* name is a ConfigError
    naming it and the closest known name."""
    by_env = {env_name(k): k for k in _PARSERS}
    out: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in NON_SETTING_ENV:
            continue
        if name not in by_env:
            raise ConfigError(f"unknown environment variable {name}{_did_you_mean(name, [*by_env, *NON_SETTING_ENV])}"
                              f" (LORAPLEX_* variables are settings; see README 'Configuration')", key=name)
        out[by_env[name]] = value
    return out


def env_value(name: str, env: Mapping[str, str] = os.environ) -> str | None:
    """The value of one of NON_SETTING_ENV's variables ('' counts as unset)."""
    if name not in NON_SETTING_ENV:
        raise KeyError(f"{name} is not one of loraplex's non-setting variables")
    return env.get(name) or None


def find_model_config(explicit: str | os.PathLike | None, env: Mapping[str, str] = os.environ,
                      cwd: str | os.PathLike | None = None) -> Path | None:
    """The model-config.yaml a command-line tool reads: `explicit` (a flag), else LORAPLEX_MODEL_CONFIG,
    else ./model-config.yaml when it exists, else None (defaults, env and flags only)."""
    if explicit:
        return Path(explicit)
    named = env_value("LORAPLEX_MODEL_CONFIG", env)
    if named:
        return Path(named)
    here = Path(cwd or os.getcwd()) / MODEL_CONFIG_FILE
    return here if here.is_file() else None


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _read_handler_section(path: Path) -> Mapping[str, Any]:
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read model config {str(path)!r}: {e.strerror or e}") from e
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"model config {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(doc, Mapping):
        raise ConfigError(f"model config {str(path)!r} must be a YAML mapping")
    section = doc.get("handler") or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"'handler' section of {str(path)!r} must be a mapping", key="handler")
    return section


# ---------------------------------------------------------------------- typed parsers
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _str(key: str, v: Any) -> str:
    if isinstance(v, (bool, int, float)) or not isinstance(v, (str, os.PathLike)):
        raise ConfigError(f"config key {key!r} must be a string, got {type(v).__name__}", key=key)
    return os.fspath(v)


def _nonempty_str(key: str, v: Any) -> str:
    s = _str(key, v).strip()
    if not s:
        raise ConfigError(f"config key {key!r} must not be empty", key=key)
    return s


def _int(minimum: int, why: str = "") -> Callable[[str, Any], int]:
    def parse(key: str, v: Any) -> int:
        if isinstance(v, bool):
            raise ConfigError(f"config key {key!r} must be an integer, got a boolean", key=key)
        if isinstance(v, str):
            try:
                v = int(v.strip().replace("_", ""))
            except ValueError:
                raise ConfigError(f"config key {key!r} must be an integer, got {v!r}", key=key) from None
        if not isinstance(v, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {type(v).__name__}", key=key)
        if v < minimum:
            raise ConfigError(f"config key {key!r} must be >= {minimum}{why}, got {v}", key=key)
        return v
    return parse


def _float(minimum: float) -> Callable[[str, Any], float]:
    def parse(key: str, v: Any) -> float:
        if isinstance(v, bool):
            raise ConfigError(f"config key {key!r} must be a number, got a boolean", key=key)
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise ConfigError(f"config key {key!r} must be a number, got {v!r}", key=key) from None
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"config key {key!r} must be a finite number, got {v!r}", key=key)
        if v < minimum:
            raise ConfigError(f"config key {key!r} must be >= {minimum}, got {v}", key=key)
        return float(v)
    return parse


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise ConfigError(f"config key {key!r} must be true or false, got {v!r}", key=key)


def _choice(*choices: str, pattern: str | None = None) -> Callable[[str, Any], str]:
    def parse(key: str, v: Any) -> str:
        s = _str(key, v).strip().lower()
        if s in choices or (pattern and re.fullmatch(pattern, s)):
            return s
        raise ConfigError(f"config key {key!r} must be one of {'|'.join(choices)}, got {v!r}", key=key)
    return parse


def _list_of(what: str, pattern: str, *, empty_ok: bool) -> Callable[[str, Any], tuple[str, ...]]:
    """A list (or, from env, a comma-separated string) of names each matching `pattern`; duplicates
    dropped, order kept."""
    def parse(key: str, v: Any) -> tuple[str, ...]:
        if isinstance(v, str):
            items = [p.strip() for p in v.split(",")]
        elif isinstance(v, (list, tuple)):
            items = [_str(key, p).strip() for p in v]
        else:
            raise ConfigError(f"config key {key!r} must be a list or a comma-separated string", key=key)
        items = [p for p in items if p]
        if not items and not empty_ok:
            raise ConfigError(f"config key {key!r} must name at least one {what}", key=key)
        for p in items:
            if not re.fullmatch(pattern, p):
                raise ConfigError(f"config key {key!r}: {p!r} is not a valid {what}", key=key)
        return tuple(dict.fromkeys(items))
    return parse


def _int_list(minimum: int) -> Callable[[str, Any], tuple[int, ...]]:
    """A list of integers (or, from env, a comma-separated string), each >= minimum; sorted, duplicates dropped."""
    item = _int(minimum)

    def parse(key: str, v: Any) -> tuple[int, ...]:
        if isinstance(v, str):
            items = [p.strip() for p in v.split(",") if p.strip()]
        elif isinstance(v, (list, tuple)):
            items = list(v)
        else:
            raise ConfigError(f"config key {key!r} must be a list of integers or a comma-separated string", key=key)
        return tuple(sorted({item(key, p) for p in items}))
    return parse


_modules = _list_of("module name", r"[A-Za-z0-9_.]+", empty_ok=False)
_tenant_ids = _list_of("tenant id", r"[a-z0-9][a-z0-9_-]{0,62}", empty_ok=True)


def _url(*schemes: str) -> Callable[[str, Any], str]:
    def parse(key: str, v: Any) -> str:
        s = _nonempty_str(key, v)
        if not any(s.startswith(sc + "://") for sc in schemes):
            raise ConfigError(f"config key {key!r} must be a {'/'.join(schemes)} URL, got {s!r}", key=key)
        return s.rstrip("/") if schemes[0].startswith("http") else s
    return parse


def _host_port(key: str, v: Any) -> str:
    s = _str(key, v)
    if s and not re.fullmatch(r"[A-Za-z0-9.:\[\]-]{1,253}:[0-9]{1,5}", s):
        raise ConfigError(f"config key {key!r} must be host:port (or empty), got {s!r}", key=key)
    return s


def _prefix(key: str, v: Any) -> str:
    s = _nonempty_str(key, v)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", s):
        raise ConfigError(f"config key {key!r} must be 1-64 characters of A-Z a-z 0-9 _ . : -, got {s!r}", key=key)
    return s


def _router(key: str, v: Any) -> str:
    """"builtin" or a Python callable named "package.module:callable" (imported by the worker at start)."""
    s = _nonempty_str(key, v)
    if s.lower() == "builtin":
        return "builtin"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", s):
        raise ConfigError(f"config key {key!r} must be 'builtin' or 'package.module:callable', got {s[:80]!r}", key=key)
    return s


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "redis_url": _url("redis", "rediss", "unix"),
    "redis_prefix": _prefix,
    "adapter_store": _nonempty_str,
    "adapter_store_endpoint": _str,
    "base_model_dir": _str,
    "base_model_name": _str,
    "max_rank": _int(1),
    "max_adapter_bytes": _int(1),
    "num_slots": _int(MIN_SLOTS, " (slot 0 is the base model and one slot is the spare)"),
    "idle_ttl_s": _float(0.0),
    "unknown_tenant_policy": _choice("base", "reject"),
    "unknown_task_policy": _choice("reject", "default"),
    "load_failure_policy": _choice("base", "error"),
    "require_tenant": _bool,
    "require_tenant_key": _bool,
    "max_new_tokens_cap": _int(1),
    "max_prompt_tokens": _int(1),
    "device": _choice("auto", "cpu", "cuda", pattern=r"cuda:[0-9]{1,2}"),
    "dtype": _choice("auto", "float32", "bfloat16", "float16"),
    "engine": _choice("multilora", "peft"),
    "decode": _choice("auto", "generate", "static", "graphs"),
    "decode_graph_buckets": _int(1),
    "lora_backend": _choice("auto", "torch", "triton"),
    "triton_pdl": _bool,
    "cpu_gather_workspace_mb": _int(0),
    "target_modules": _modules,
    "host_tier_mb": _int(0),
    "max_pinned_adapters": _int(0),
    "prefetch_top_n": _int(0),
    "prefetch_tenants": _tenant_ids,
    "metrics_max_adapters": _int(1),
    "epp_metrics_address": _host_port,
    "scheduler": _choice("continuous", "static"),
    "kv_rows": _int(1),
    "kv_max_len": _int(0),
    "prefill_chunk": _int(1),
    "prefill_wait_steps": _int(0),
    "prefill_graphs": _bool,
    "step_overlap": _choice("auto", "on", "off"),
    "step_mixed": _choice("auto", "on", "off"),
    "mixed_prefill_tokens": _int(1),
    "graph_batch_sizes": _int_list(1),
    "max_waiting": _int(0),
    "retry_after_s": _int(0),
    "tenant_max_running": _int(0),
    "request_timeout_s": _float(0.0),
    "admission_max_wait_s": _float(0.0),
    "drain_preempt_tokens": _int(0),
    "negative_cache_s": _float(0.0),
    "registry_cache_s": _float(0.0),
    "registry_stale_s": _float(0.0),
    "management_url": _url("http", "https"),
    "model_name": _nonempty_str,
    "model_store": _nonempty_str,
    "management_key_file": _nonempty_str,
    "onboarding_address": _host_port,
    "quota_max_tasks": _int(0),
    "quota_max_versions": _int(0),
    "quota_max_bytes": _int(0),
    "task_router": _router,
    "max_fanout_rows": _int(1),
}
assert set(_PARSERS) == {f.name for f in fields(LoraplexConfig)}, "every config key needs a parser"


def parse_value(key: str, value: Any) -> Any:
    """One key's value through its typed parser (what a YAML or env value becomes)."""
    if key not in _PARSERS:
        raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, _PARSERS)}", key=key)
    return _PARSERS[key](key, value)
