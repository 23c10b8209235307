"""GPU kernels for the multilora engine (optional: importing needs neither triton nor CUDA).

`triton_lora.available()` says whether the Triton backend can run here;
`triton_lora.add_mixed_triton_` is the entry point the layers need, plus
`group_deltas_triton` for the group launches of `multilora.groups` (graph-captured
decode steps and CUDA prefill).
"""
from .triton_lora import add_mixed_triton_, available, group_deltas_triton, lora_expand_add_, lora_shrink

__all__ = ["available", "add_mixed_triton_", "group_deltas_triton", "lora_shrink", "lora_expand_add_"]
