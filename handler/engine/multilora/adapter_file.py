"""Read and validate a PEFT LoRA adapter directory without building any module.

Why separate from the pool: everything that can make a load fail is checked
here *before* a slot is touched, so a refused adapter leaves no trace.
Tensors are read through `safetensors.safe_open` (memory-mapped); shapes are
checked from the header before any tensor data is read. Never `torch.load`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import AdapterFormatError, UnsupportedAdapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# Config switches whose non-default value changes the math; refused rather than ignored.
_REFUSED_TRUE = {
    "use_dora": "DoRA (use_dora=true) is not supported",
    "lora_bias": "a bias on lora_B (lora_bias=true) is not supported",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D-style weights) is not supported",
    "use_qalora": "QALoRA (use_qalora=true) is not supported",
}
_REFUSED_NONEMPTY = {
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "layer_replication": "layer_replication is not supported",
}


@dataclass(frozen=True)
class ModuleWeights:
    """One target module of the adapter: keys into the file, rank and scaling."""

    module: str  # base-model module name, e.g. "model.layers.0.self_attn.q_proj"
    key_a: str
    key_b: str
    rank: int
    scale: float


@dataclass(frozen=True)
class AdapterFile:
    path: Path
    weights_path: Path
    config: dict[str, Any]
    modules: tuple[ModuleWeights, ...]

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules)


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    # Same rule as peft.utils.other.get_pattern_key: a key matches a dotted suffix (regex allowed).
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targets(config: Mapping[str, Any], module: str) -> bool:
    tm = config.get("target_modules")
    if isinstance(tm, str):
        return re.fullmatch(tm, module) is not None
    if not tm:
        return False
    return any(module == t or module.endswith("." + t) for t in tm)


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise AdapterFormatError(f"{path}: no {CONFIG_NAME}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{cfg_path}: unreadable adapter config ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{cfg_path}: adapter config is not a JSON object")
    return config


def check_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse adapter kinds whose math this engine does not implement."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapter(f"{where}: peft_type {peft_type!r} is not supported (only LORA)")
    for key, msg in _REFUSED_TRUE.items():
        if config.get(key):
            raise UnsupportedAdapter(f"{where}: {msg}")
    for key, msg in _REFUSED_NONEMPTY.items():
        if config.get(key):
            raise UnsupportedAdapter(f"{where}: {msg}")
    bias = config.get("bias", "none")
    if bias != "none":
        raise UnsupportedAdapter(f"{where}: bias={bias!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise AdapterFormatError(f"{where}: {key}={v!r} must be a positive number")


def _classify_key(key: str) -> tuple[str, str]:
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    if "lora_magnitude_vector" in name:
        raise UnsupportedAdapter(f"tensor {key!r}: DoRA magnitude vectors are not supported")
    if "lora_embedding" in name:
        raise UnsupportedAdapter(f"tensor {key!r}: LoRA on an embedding layer targets a module that is not a "
                                 "wrapped linear layer")
    if name.endswith(".lora_B.bias"):
        raise UnsupportedAdapter(f"tensor {key!r}: a bias on lora_B is not supported")
    if name.endswith(".base_layer.weight"):
        raise UnsupportedAdapter(f"tensor {key!r}: the adapter carries full base-layer weights "
                                 "(save_embedding_layers / modules_to_save), which are not supported")
    raise AdapterFormatError(f"unexpected tensor {key!r} in adapter file")


def read_adapter(path: str | Path, layer_shapes: Mapping[str, tuple[int, int]], max_rank: int) -> AdapterFile:
    """Validate an adapter against the wrapped layers (name -> (in, out)) and the pool's max rank."""
    from safetensors import safe_open

    path = Path(path)
    config = read_config(path)
    where = str(path)
    check_config(config, where)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterFormatError(f"{where}: no {WEIGHTS_NAME} (only safetensors adapters are loaded)")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    try:
        handle = safe_open(str(weights_path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterFormatError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    with handle as f:
        found: dict[str, dict[str, str]] = {}
        shapes: dict[str, list[int]] = {}
        # LoRA tensors first, so the most specific complaint (e.g. an unwrapped target) wins.
        for key in sorted(f.keys(), key=lambda k: ("lora_" not in k, k)):
            module, kind = _classify_key(key)
            if module not in layer_shapes:
                raise UnsupportedAdapter(f"{where}: targets {module!r}, which is not a wrapped linear layer "
                                         f"(wrapped: {_summarise(layer_shapes)})")
            found.setdefault(module, {})[kind] = key
            shapes[key] = list(f.get_slice(key).get_shape())
    if not found:
        raise AdapterFormatError(f"{where}: adapter file holds no LoRA tensors")

    modules = []
    for module in sorted(found):
        pair = found[module]
        for kind in ("A", "B"):
            if kind not in pair:
                raise AdapterFormatError(f"{where}: missing tensor lora_{kind} for {module!r}")
        in_f, out_f = layer_shapes[module]
        r = int(_pattern_value(rank_pattern, module, config["r"]))
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        sa, sb = shapes[pair["A"]], shapes[pair["B"]]
        if sa != [r, in_f] or sb != [out_f, r]:
            raise AdapterFormatError(f"{where}: shape mismatch for {module!r}: lora_A {sa}, lora_B {sb}, "
                                     f"expected [{r}, {in_f}] and [{out_f}, {r}] (rank {r})")
        if r > max_rank:
            raise UnsupportedAdapter(f"{where}: rank {r} of {module!r} exceeds the pool's max rank {max_rank}")
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        modules.append(ModuleWeights(module, pair["A"], pair["B"], r, scale))

    if isinstance(config.get("target_modules"), (list, str)) and config.get("layers_to_transform") is None:
        expected = {m for m in layer_shapes if _targets(config, m)}
        missing = sorted(expected - found.keys())
        if missing:
            raise AdapterFormatError(f"{where}: missing tensors for {len(missing)} targeted module(s), "
                                     f"e.g. {missing[0]!r}")
    return AdapterFile(path, weights_path, dict(config), tuple(modules))


def _summarise(layer_shapes: Mapping[str, Any]) -> str:
    kinds = sorted({name.rsplit(".", 1)[-1] for name in layer_shapes})
    return ", ".join(kinds)
