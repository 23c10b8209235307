"""The PEFT LoRA adapter format as loraplex reads it: the one home for its rules.

`files` (the two file names, limits, `AdapterBytes`: an adapter held in memory, read and hashed
once), `header` (the one strict safetensors header parser and its limit), `rules` (which PEFT
configs are accepted or refused, how `rank_pattern` / `alpha_pattern` / rslora are read, the
tensor and shape checks, the default targets, how a declared base model name is matched).

Where and why: onboarding (`tenant_registry/validate.py`) and the engines' loader
(`handler/engine/multilora/adapter_file.py`) both call `check_adapter`, and neither may import
the other's package (the engine imports nothing from `tenant_registry/`, `tenant_registry/`
nothing from `handler/`), so the rules live in `loraplex_common/`, which imports neither. Nothing
here imports torch: the control plane validates without it.

Where the `safetensors` library is used: not on the load path. The slot pool copies the whole
data region in one transfer and needs the byte offsets, which the header gives (see `header`), and
the peft engine hands PEFT the checked bytes in a private directory, which PEFT reads with
`safetensors` itself. The tests hold this parser against `safetensors` (same shapes, same
refusals) and the loaded pool against `safetensors.torch.load` of the same bytes.
"""
from __future__ import annotations

from .files import (ADAPTER_FILES, CONFIG_FILE, MAX_CONFIG_BYTES, PICKLE_SUFFIXES, WEIGHTS_FILE, AdapterBytes, Into,
                    ReadBuffer, read_file)
from .header import MAX_HEADER_BYTES, HeaderError, SafetensorsHeader, TensorInfo, parse_header, read_header
from .rules import (DEFAULT_TARGET_MODULES, FLOAT_DTYPES, AdapterConfig, AdapterRefused, LinearLayers, ModuleWeights,
                    ParsedAdapter, check_adapter, check_base_model, check_weights, parse_config, same_base_model)

__all__ = [
    "ADAPTER_FILES", "CONFIG_FILE", "MAX_CONFIG_BYTES", "PICKLE_SUFFIXES", "WEIGHTS_FILE", "AdapterBytes", "Into",
    "ReadBuffer", "read_file",
    "MAX_HEADER_BYTES", "HeaderError", "SafetensorsHeader", "TensorInfo", "parse_header", "read_header",
    "DEFAULT_TARGET_MODULES", "FLOAT_DTYPES", "AdapterConfig", "AdapterRefused", "LinearLayers", "ModuleWeights",
    "ParsedAdapter", "check_adapter", "check_base_model", "check_weights", "parse_config", "same_base_model",
]
