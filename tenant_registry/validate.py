"""Adapter validation against the base model: everything is checked BEFORE anything is written.

Who calls it: `onboarding.onboard` (the CLI process). It reads the tenant's
directory, never executes or unpickles anything, and never imports torch.

What a tenant's adapter directory may contain (the directory rules are onboarding's own):
  * `adapter_config.json` and `adapter_model.safetensors` -- required, regular files;
  * pickle-ish files (*.bin *.pt *.pth *.pkl *.ckpt *.pickle) -- the whole adapter is
    refused, because their presence means the tenant handed us pickled weights;
  * symlinks of any kind -- refused (a link can point outside the directory,
    e.g. at another tenant's adapter or /etc/shadow);
  * anything else (PEFT's README.md, training args JSON, sub-directories) -- ignored
    and NOT copied into the store. Deliberate: PEFT writes a README.md next to
    every adapter, refusing it would refuse every real adapter.

Checks on the adapter itself: the weights file is at most `max_bytes`, then exactly the rules the
worker's engines load by (`loraplex_common.adapter_format.check_adapter`: which PEFT options are
accepted or refused, rank <= max_rank, the safetensors header, every tensor a LoRA A/B of a base
linear layer among the configured `target_modules` with the shapes its rank implies), so an
adapter onboarding accepts is one the engines load, and one they refuse is refused here first,
with the same message. The base model identity rule is onboarding's
(`adapter_format.check_base_model`): when `base_model_name` is configured, the adapter's
`base_model_name_or_path` must equal it or have the same last path component, case-insensitively;
"" accepts any name (shapes are still checked).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from loraplex_common.adapter_format import (ADAPTER_FILES, CONFIG_FILE, MAX_CONFIG_BYTES, PICKLE_SUFFIXES,
                                            WEIGHTS_FILE, AdapterBytes, AdapterRefused, HeaderError, LinearLayers,
                                            check_adapter, check_base_model, parse_config, read_header,
                                            same_base_model)

from .errors import AdapterInvalid, ConfigError, shorten

__all__ = ["ADAPTER_FILES", "CONFIG_FILE", "WEIGHTS_FILE", "AdapterManifest", "BaseModelSpec", "same_base_model",
           "validate_adapter"]


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
        embedding: tuple[int, int] | None = None
        for shard in shards:
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise ConfigError(f"base model dir {str(d)!r}: bad shard name {shard!r}", key="base_model_dir")
            path = d / shard
            try:
                with open(path, "rb") as fh:
                    tensors = read_header(fh, os.fstat(fh.fileno()).st_size).tensors
            except (OSError, HeaderError) as e:
                raise ConfigError(f"base model shard {str(path)!r}: {e}", key="base_model_dir") from e
            for key, info in tensors.items():
                if key.endswith(".weight") and len(info.shape) == 2:
                    module = key[: -len(".weight")]
                    if not _is_embedding(module):
                        linear[module] = (info.shape[0], info.shape[1])
                    elif module.endswith("embed_tokens"):
                        embedding = (info.shape[0], info.shape[1])
        # Tied embeddings (SmolLM2, Llama 3.2 1B): lm_head is a linear layer of the loaded model but has
        # no tensor of its own; list it, so the adapter rules see the layers the engine sees.
        if cfg.get("tie_word_embeddings") and "lm_head" not in linear and embedding is not None:
            linear["lm_head"] = embedding
        if not linear:
            raise ConfigError(f"base model dir {str(d)!r} has no linear layers", key="base_model_dir")
        return cls(name=name or d.resolve().name, model_dir=str(d), model_type=str(cfg.get("model_type", "")),
                   linear=linear)

    def modules_matching(self, target: str) -> list[str]:
        """Base linear modules PEFT would match with target name `target` (exact or dotted suffix)."""
        return [m for m in self.linear if m == target or m.endswith("." + target)]

    def layers(self, allowed_targets: Sequence[str] | None) -> LinearLayers:
        """The linear layers as the adapter rules see them: those whose leaf name is in
        `allowed_targets` (None: all) may be modified, as the engine wraps exactly those."""
        return LinearLayers.of({m: (in_f, out_f) for m, (out_f, in_f) in self.linear.items()}, allowed_targets)


def _is_embedding(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return "embed" in leaf or leaf in ("wte", "wpe")


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
    cfg_bytes = _read_regular(src / CONFIG_FILE, MAX_CONFIG_BYTES, "config_too_large", "")
    # The config first (cheap): a refused option or another base model is reported before a big file is read.
    config = _refusing(parse_config, cfg_bytes)
    _refusing(check_base_model, config, base_model_name)
    weights = _read_regular(src / WEIGHTS_FILE, max_bytes, "too_large", " the maximum of")
    adapter = AdapterBytes.of(cfg_bytes, weights, str(src))
    parsed = _refusing(check_adapter, adapter, spec.layers(allowed_targets), max_rank)
    modules = [m.module for m in parsed.modules]
    return AdapterManifest(
        rank=config.r, alpha=config.lora_alpha, use_rslora=config.use_rslora,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})), modules=tuple(sorted(modules)),
        sha256=adapter.sha256, nbytes=len(weights), config_sha256=hashlib.sha256(cfg_bytes).hexdigest(),
        base_model=spec.name, declared_base_model=config.base_model_name_or_path)


def _refusing(rule, *args):
    """Run one of the shared adapter rules; its refusal becomes this package's AdapterInvalid."""
    try:
        return rule(*args)
    except AdapterRefused as r:
        raise AdapterInvalid(r.reason, code=r.code, file=r.file) from r


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


def _read_regular(path: Path, limit: int, code: str, what: str) -> bytes:
    """The whole file, opened without following symlinks, confirmed regular (the lstat check could be
    raced) and at most `limit` bytes, read once."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise AdapterInvalid(f"cannot open ({e.strerror})", code="unreadable", file=path.name) from e
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise AdapterInvalid("is not a regular file", code="not_regular_file", file=path.name)
        if st.st_size > limit:
            raise AdapterInvalid(f"is {st.st_size} bytes, more than{what} {limit}", code=code, file=path.name)
        data = fh.read(limit + 1)
    if len(data) != st.st_size:
        raise AdapterInvalid("changed while being read", code="changed_during_read", file=path.name)
    return data
