"""The PEFT LoRA adapter format as loraplex reads it: the one home for its rules.

(Being filled in: file names, the safetensors header parser and its limit, the PEFT-config
rules, the default targets.)
"""
from __future__ import annotations

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
