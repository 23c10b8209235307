"""GPU kernels for the multilora engine (optional: importing needs neither triton nor CUDA).

`triton_lora.available()` says whether the Triton backend can run here;
`triton_lora.add_mixed_triton_` is the entry point the layers need, plus
the group launches of `multilora.groups`: `group_decode_linears` (a graph-captured
decode step: shrink, then each member's GEMM with the expand fused in),
`group_deltas_triton` (prefill, and decode without the fused GEMMs) and
`group_gated_act` (a gated MLP's prefill activation with gate/up's expands fused in), and
`warm_prefill` (compiles every launch variant the prefill kernels can take, before serving).
`tuning` is what a bench times them through under chosen launch shapes (the engine never uses it).
Nothing here imports `multilora`; the CPU fallback uses `handler.engine.lora_ops`.
"""
from .triton_lora import (add_mixed_triton_, available, group_decode_linears, group_deltas_triton, group_gated_act,
                          compiled_variants, lora_expand_add_, lora_shrink, warm_prefill)

__all__ = ["available", "add_mixed_triton_", "group_deltas_triton", "group_decode_linears", "group_gated_act",
           "lora_shrink", "lora_expand_add_", "warm_prefill", "compiled_variants"]
