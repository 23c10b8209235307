"""LoraplexConfig: the one configuration object of loraplex (handler, engine and CLI all read it).

Sources, lowest to highest precedence:
  1. the defaults below;
  2. the `handler:` section of TorchServe's model-config.yaml;
  3. environment variables `LORAPLEX_<KEY UPPER>` (e.g. LORAPLEX_REDIS_URL);
  4. `overrides` passed by the caller (the CLI's flags).

Why strict: an unknown key in the `handler:` section (a typo such as
`max_resident_adapter`) is an error naming the key, not a silently ignored
setting. Values coming from env are strings and are parsed with the same typed
parsers as YAML values. Every error is a ConfigError whose `key` is the bad key.

Relative paths (`adapter_store`, `base_model_dir`) are kept as given; they are
resolved against the process's working directory by whoever opens them, so
deployments should use absolute paths.

Immutable once built; safe to share between threads.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError

ENV_PREFIX = "LORAPLEX_"
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraplexConfig:
    """Every loraplex setting. See the README's config table for what each key does."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "loraplex"
    adapter_store: str = "./var/adapters"
    base_model_dir: str = ""            # "" = the TorchServe model dir
    base_model_name: str = ""           # identity adapters must name; "" = any name (shapes still checked)
    max_rank: int = 64
    max_adapter_bytes: int = 268435456
    max_resident_adapters: int = 8
    idle_ttl_s: float = 600.0
    unknown_tenant_policy: str = "base"     # base | reject
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
    cpu_gather_workspace_mb: int = 512      # CPU: memory kept for gathering mixed batches' adapters (0 = none)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    negative_cache_s: float = 30.0
    registry_cache_s: float = 30.0          # max staleness of a worker's tenant cache when events are missed
    registry_stale_s: float = 300.0         # how long a worker may serve a cached tenant while Redis is unreachable
    management_url: str = "http://127.0.0.1:8081"
    model_name: str = "loraplex"

    # ------------------------------------------------------------------ building
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "LoraplexConfig":
        """Build from a plain mapping (e.g. a parsed `handler:` section). Unknown keys are errors."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"handler settings must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r} (known keys: {', '.join(sorted(known))})",
                              key=unknown[0])
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
        passed through unconditionally).
        """
        merged: dict[str, Any] = {}
        if model_config_path:
            merged.update(_read_handler_section(Path(model_config_path)))
        if handler_section is not None:
            if not isinstance(handler_section, Mapping):
                raise ConfigError("'handler' section must be a mapping", key="handler")
            merged.update(handler_section)
        for f in fields(cls):
            env_key = ENV_PREFIX + f.name.upper()
            if env_key in env:
                merged[f.name] = env[env_key]
        for k, v in (overrides or {}).items():
            if v is not None:
                merged[k] = v
        return cls.from_mapping(merged)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (target_modules as a list)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["target_modules"] = list(self.target_modules)
        return out


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


def _int(minimum: int) -> Callable[[str, Any], int]:
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
            raise ConfigError(f"config key {key!r} must be >= {minimum}, got {v}", key=key)
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


def _modules(key: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        items = [p.strip() for p in v.split(",")]
    elif isinstance(v, (list, tuple)):
        items = [_str(key, p).strip() for p in v]
    else:
        raise ConfigError(f"config key {key!r} must be a list or a comma-separated string", key=key)
    items = [p for p in items if p]
    if not items:
        raise ConfigError(f"config key {key!r} must name at least one module", key=key)
    for p in items:
        if not re.fullmatch(r"[A-Za-z0-9_.]+", p):
            raise ConfigError(f"config key {key!r}: bad module name {p!r}", key=key)
    return tuple(dict.fromkeys(items))


def _url(*schemes: str) -> Callable[[str, Any], str]:
    def parse(key: str, v: Any) -> str:
        s = _nonempty_str(key, v)
        if not any(s.startswith(sc + "://") for sc in schemes):
            raise ConfigError(f"config key {key!r} must be a {'/'.join(schemes)} URL, got {s!r}", key=key)
        return s.rstrip("/") if schemes[0].startswith("http") else s
    return parse


def _prefix(key: str, v: Any) -> str:
    s = _nonempty_str(key, v)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", s):
        raise ConfigError(f"config key {key!r} must be 1-64 characters of A-Z a-z 0-9 _ . : -, got {s!r}", key=key)
    return s


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "redis_url": _url("redis", "rediss", "unix"),
    "redis_prefix": _prefix,
    "adapter_store": _nonempty_str,
    "base_model_dir": _str,
    "base_model_name": _str,
    "max_rank": _int(1),
    "max_adapter_bytes": _int(1),
    "max_resident_adapters": _int(1),
    "idle_ttl_s": _float(0.0),
    "unknown_tenant_policy": _choice("base", "reject"),
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
    "cpu_gather_workspace_mb": _int(0),
    "target_modules": _modules,
    "negative_cache_s": _float(0.0),
    "registry_cache_s": _float(0.0),
    "registry_stale_s": _float(0.0),
    "management_url": _url("http", "https"),
    "model_name": _nonempty_str,
}
assert set(_PARSERS) == {f.name for f in fields(LoraplexConfig)}, "every config key needs a parser"
