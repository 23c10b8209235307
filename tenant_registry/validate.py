"""Adapter validation against the base model: everything is checked BEFORE anything is written.

Who calls it: `onboarding.onboard` (the CLI process). It reads the tenant's
directory, never executes or unpickles anything, and never imports torch.

What a tenant's adapter directory may contain:
  * `adapter_config.json` and `adapter_model.safetensors` -- required, regular files;
  * pickle-ish files (*.bin *.pt *.pth *.pkl *.ckpt *.pickle) -- the whole adapter is
    refused, because their presence means the tenant handed us pickled weights;
  * symlinks of any kind -- refused (a link can point outside the directory,
    e.g. at another tenant's adapter or /etc/shadow);
  * anything else (PEFT's README.md, training args JSON, sub-directories) -- ignored
    and NOT copied into the store. Deliberate: PEFT writes a README.md next to
    every adapter, refusing it would refuse every real adapter.

Checks on the adapter itself: peft_type LORA; no DoRA; bias "none"; no option
the engines cannot honour (rank_pattern, alpha_pattern, modules_to_save, ...);
1 <= r <= max_rank; weights file <= max_bytes; a well-formed safetensors header;
every tensor is `base_model.model.<module>.lora_{A,B}.weight` of a module the
base model has as a linear layer and that is one of the configured
`target_modules`; A = (r, in_features), B = (out_features, r) of that module;
every entry of the config's target_modules exists in the base model and has
weights; floating dtypes only.

Base model identity: when `base_model_name` is configured, the adapter's
`base_model_name_or_path` must equal it exactly, or its last path component
must equal the configured name's last path component, case-insensitively
("HuggingFaceTB/SmolLM2-135M-Instruct" matches "smollm2-135m-instruct").
When it is "" any name (or none) is accepted; shapes are still checked.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import AdapterInvalid, ConfigError, shorten
from .safetensors_header import HeaderError, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")
MAX_CONFIG_BYTES = 1024 * 1024
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# PEFT LoraConfig options that change what the weights mean in ways the engines do not implement.
UNSUPPORTED_OPTIONS = ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "lora_bias",
                       "target_parameters", "fan_in_fan_out", "trainable_token_indices", "use_qalora")
_KEY_RE = re.compile(r"base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])\.weight")
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class BaseModelSpec:
    """What validation needs to know about the base model: its name and every linear layer's dims.

    Built from config.json + safetensors headers only (no weights are loaded),
    so the CLI can validate without torch and in milliseconds.
    """

    name: str
    model_dir: str
    model_type: str
    linear: Mapping[str, tuple[int, int]] = field(repr=False)  # module path -> (out_features, in_features)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, name: str | None = None) -> "BaseModelSpec":
        """Read `<dir>/config.json` and the headers of `model.safetensors` or of the shards listed in
        `model.safetensors.index.json`. `name` defaults to the directory's name. Raises ConfigError."""
        d = Path(model_dir)
        try:
            cfg = json.loads((d / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"base model dir {str(d)!r}: cannot read config.json ({e})", key="base_model_dir") from e
        index = d / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConfigError(f"base model dir {str(d)!r}: bad model.safetensors.index.json ({e})",
                                  key="base_model_dir") from e
        elif (d / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            raise ConfigError(f"base model dir {str(d)!r} has no model.safetensors or model.safetensors.index.json",
                              key="base_model_dir")
        linear: dict[str, tuple[int, int]] = {}
        for shard in shards:
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise ConfigError(f"base model dir {str(d)!r}: bad shard name {shard!r}", key="base_model_dir")
            path = d / shard
            try:
                with open(path, "rb") as fh:
                    tensors, _ = read_header(fh, os.fstat(fh.fileno()).st_size)
            except (OSError, HeaderError) as e:
                raise ConfigError(f"base model shard {str(path)!r}: {e}", key="base_model_dir") from e
            for key, info in tensors.items():
                if key.endswith(".weight") and len(info.shape) == 2:
                    module = key[: -len(".weight")]
                    if not _is_embedding(module):
                        linear[module] = (info.shape[0], info.shape[1])
        if not linear:
            raise ConfigError(f"base model dir {str(d)!r} has no linear layers", key="base_model_dir")
        return cls(name=name or d.resolve().name, model_dir=str(d), model_type=str(cfg.get("model_type", "")),
                   linear=linear)

    def modules_matching(self, target: str) -> list[str]:
        """Base linear modules PEFT would match with target name `target` (exact or dotted suffix)."""
        return [m for m in self.linear if _matches(m, target)]


def _is_embedding(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return "embed" in leaf or leaf in ("wte", "wpe")


def _matches(module: str, target: str) -> bool:
    return module == target or module.endswith("." + target)


@dataclass(frozen=True)
class AdapterManifest:
    """What validation found: everything the registry record needs, plus the config file's hash so the
    store can prove it copied exactly the bytes that were validated."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]   # leaf names of the modules the weights modify, sorted
    modules: tuple[str, ...]          # full module paths, sorted
    sha256: str                       # of adapter_model.safetensors
    nbytes: int                       # size of adapter_model.safetensors
    config_sha256: str
    base_model: str                   # the base model it was validated against (BaseModelSpec.name)
    declared_base_model: str | None   # the adapter config's base_model_name_or_path


def validate_adapter(src_dir: str | os.PathLike, spec: BaseModelSpec, *, max_rank: int, max_bytes: int,
                     base_model_name: str = "", allowed_targets: Sequence[str] | None = None) -> AdapterManifest:
    """Check the adapter in `src_dir` against `spec`; raise AdapterInvalid naming the first problem.

    Reads only; writes nothing anywhere. `allowed_targets` (the config's target_modules) restricts which
    module names an adapter may touch; None allows any linear layer of the base model.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise AdapterInvalid(f"adapter directory {str(src)!r} does not exist or is not a directory",
                             code="not_a_directory")
    _check_entries(src)
    cfg_bytes, cfg_sha = _read_small(src / CONFIG_FILE)
    cfg = _parse_config(cfg_bytes, base_model_name)
    rank = cfg["r"]
    if rank > max_rank:
        raise AdapterInvalid(f"rank r={rank} exceeds the maximum rank {max_rank}", code="rank_too_large",
                             file=CONFIG_FILE)
    tensors, sha, nbytes = _read_weights(src / WEIGHTS_FILE, max_bytes)
    modules = _check_tensors(tensors, spec, rank, cfg["target_modules"], allowed_targets)
    return AdapterManifest(
        rank=rank, alpha=float(cfg.get("lora_alpha", 8)), use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})), modules=tuple(sorted(modules)),
        sha256=sha, nbytes=nbytes, config_sha256=cfg_sha, base_model=spec.name,
        declared_base_model=cfg.get("base_model_name_or_path"))


# ---------------------------------------------------------------------------- steps
def _check_entries(src: Path) -> None:
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.is_symlink():
            target = os.readlink(e.path)
            resolved = Path(e.path).resolve()
            outside = not resolved.is_relative_to(src.resolve())
            where = " leading outside the adapter directory" if outside else ""
            raise AdapterInvalid(f"is a symlink{where} (-> {shorten(target, 80)}); symlinks are not accepted",
                                 code="symlink", file=e.name)
        if e.name.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterInvalid("pickle-based weights are not accepted; provide adapter_model.safetensors only",
                                 code="pickle_file", file=e.name)
    for name in ADAPTER_FILES:
        try:
            st = os.lstat(src / name)
        except FileNotFoundError:
            raise AdapterInvalid("required file is missing", code="missing_file", file=name) from None
        if not stat.S_ISREG(st.st_mode):
            raise AdapterInvalid("is not a regular file", code="not_regular_file", file=name)


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open without following symlinks and confirm it is a regular file (the lstat check could be raced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise AdapterInvalid(f"cannot open ({e.strerror})", code="unreadable", file=path.name) from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise AdapterInvalid("is not a regular file", code="not_regular_file", file=path.name)
    return fd, st


def _read_small(path: Path) -> tuple[bytes, str]:
    fd, st = _open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        if st.st_size > MAX_CONFIG_BYTES:
            raise AdapterInvalid(f"is {st.st_size} bytes, more than {MAX_CONFIG_BYTES}", code="config_too_large",
                                 file=path.name)
        data = fh.read(MAX_CONFIG_BYTES + 1)
    return data, hashlib.sha256(data).hexdigest()


def _parse_config(raw: bytes, base_model_name: str) -> dict[str, Any]:
    def bad(reason: str, code: str = "bad_config") -> AdapterInvalid:
        return AdapterInvalid(reason, code=code, file=CONFIG_FILE)

    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"not valid JSON ({str(e)[:120]})") from None
    if not isinstance(cfg, dict):
        raise bad("must be a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise bad(f"peft_type must be \"LORA\", got {shorten(cfg.get('peft_type'))}", code="not_lora")
    if cfg.get("use_dora"):
        raise bad("DoRA adapters (use_dora: true) are not supported", code="dora")
    if cfg.get("bias", "none") != "none":
        raise bad(f"bias must be \"none\", got {shorten(cfg.get('bias'))}", code="bias")
    for opt in UNSUPPORTED_OPTIONS:
        if cfg.get(opt):
            raise bad(f"option {opt!r} is not supported (got {shorten(cfg.get(opt))})", code="unsupported_option")
    r = cfg.get("r")
    if type(r) is not int or r < 1:
        raise bad(f"r must be a positive integer, got {shorten(r)}", code="bad_rank")
    alpha = cfg.get("lora_alpha", 8)
    if type(alpha) not in (int, float) or not (alpha == alpha) or abs(alpha) == float("inf"):
        raise bad(f"lora_alpha must be a number, got {shorten(alpha)}")
    if type(cfg.get("use_rslora", False)) is not bool:
        raise bad("use_rslora must be true or false")
    tm = cfg.get("target_modules")
    if not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm):
        raise bad("target_modules must be a non-empty list of module names (regex strings are not supported)",
                  code="bad_target_modules")
    declared = cfg.get("base_model_name_or_path")
    if base_model_name:
        if not isinstance(declared, str) or not same_base_model(declared, base_model_name):
            raise bad(f"base_model_name_or_path {shorten(declared, 80)} does not name the base model "
                      f"{base_model_name!r}", code="base_model_mismatch")
    elif declared is not None and not isinstance(declared, str):
        raise bad("base_model_name_or_path must be a string")
    return cfg


def same_base_model(declared: str, expected: str) -> bool:
    """Exact match, or equal last path components (case-insensitive). See the module docstring."""
    if declared == expected:
        return True
    def last(s: str) -> str:
        return re.split(r"[/\\]", s.rstrip("/\\"))[-1].lower()
    return bool(last(declared)) and last(declared) == last(expected)


def _read_weights(path: Path, max_bytes: int) -> tuple[dict, str, int]:
    st = os.lstat(path)
    if st.st_size > max_bytes:
        raise AdapterInvalid(f"is {st.st_size} bytes, more than the maximum of {max_bytes}", code="too_large",
                             file=path.name)
    fd, st = _open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        if st.st_size > max_bytes:
            raise AdapterInvalid(f"is {st.st_size} bytes, more than the maximum of {max_bytes}", code="too_large",
                                 file=path.name)
        try:
            tensors, _meta = read_header(fh, st.st_size)
        except HeaderError as e:
            raise AdapterInvalid(f"not a valid safetensors file: {e}", code="corrupt_safetensors",
                                 file=path.name) from None
        fh.seek(0)
        h = hashlib.sha256()
        n = 0
        while chunk := fh.read(_READ_CHUNK):
            h.update(chunk)
            n += len(chunk)
    if n != st.st_size:
        raise AdapterInvalid("changed while being read", code="changed_during_read", file=path.name)
    return tensors, h.hexdigest(), n


def _check_tensors(tensors: Mapping, spec: BaseModelSpec, rank: int, config_targets: Iterable[str],
                   allowed_targets: Sequence[str] | None) -> set[str]:
    def bad(reason: str, code: str) -> AdapterInvalid:
        return AdapterInvalid(reason, code=code, file=WEIGHTS_FILE)

    if not tensors:
        raise bad("contains no tensors", "no_tensors")
    config_targets = list(config_targets)
    seen: dict[str, set[str]] = {}
    for key, info in sorted(tensors.items()):
        m = _KEY_RE.fullmatch(key)
        if m is None:
            raise bad(f"unexpected tensor {shorten(key, 120)}: only "
                      "'base_model.model.<module>.lora_A.weight' / '.lora_B.weight' are accepted", "unexpected_tensor")
        module, ab = m.group("module"), m.group("ab")
        if module not in spec.linear:
            raise bad(f"tensor {shorten(key, 120)} is for module {module!r}, which the base model "
                      f"{spec.name!r} does not have as a linear layer", "unknown_module")
        leaf = module.rsplit(".", 1)[-1]
        if allowed_targets is not None and not any(_matches(module, t) for t in allowed_targets):
            raise bad(f"module {module!r} is not an allowed target (allowed: {', '.join(allowed_targets)})",
                      "target_not_allowed")
        if not any(_matches(module, t) for t in config_targets):
            raise bad(f"tensor for module {module!r} but {leaf!r} is not in the config's target_modules",
                      "config_mismatch")
        if info.dtype not in FLOAT_DTYPES:
            raise bad(f"tensor {shorten(key, 120)} has dtype {info.dtype}; expected one of {FLOAT_DTYPES}", "bad_dtype")
        out_f, in_f = spec.linear[module]
        expected = (rank, in_f) if ab == "A" else (out_f, rank)
        if info.shape != expected:
            raise bad(f"tensor {shorten(key, 120)} has shape {list(info.shape)}, expected {list(expected)} "
                      f"(r={rank}, base layer {module} is out={out_f} x in={in_f})", "shape_mismatch")
        seen.setdefault(module, set()).add(ab)
    for module, parts in sorted(seen.items()):
        if parts != {"A", "B"}:
            missing = ({"A", "B"} - parts).pop()
            raise bad(f"module {module!r} has no lora_{missing}.weight", "missing_tensor")
    for t in config_targets:
        if not spec.modules_matching(t):
            raise AdapterInvalid(f"target module {t!r} does not exist in the base model {spec.name!r}",
                                 code="unknown_module", file=CONFIG_FILE)
        if not any(_matches(m, t) for m in seen):
            raise bad(f"target module {t!r} has no weights", "missing_tensor")
    return set(seen)
