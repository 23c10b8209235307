"""A target linear layer with a preallocated pool of adapter slots.

Why preallocated: loading an adapter must not create modules, parameters or
allocate (that is what makes PEFT's load/switch slow and its memory drift);
it only copies into a free slot. Slot 0 stays all zeros so base-model rows
ride in the same batch.
"""
from __future__ import annotations

import torch
from torch import nn

from .context import BatchContext
from .plans import route


class MultiLoraLinear(nn.Module):
    """Wraps an `nn.Linear`; adds ``scale[slot] * x A[slot]^T B[slot]^T`` per row.

    The pool tensors are *views* into one ``[K, P]`` buffer owned by
    `MultiLoraModel` (slot-major: all of slot k's weights, in every layer, are
    one contiguous row), so freeing a slot is a single memset and nothing is
    allocated per adapter. They are plain attributes, not buffers: moving the
    module with `.to()` would split them from the shared buffer, so move the
    model *before* wrapping it. Python mirrors of per-slot rank and scaling let
    the hot path decide what to do without reading tensors (no device sync);
    what it does is `plans.route`'s choice.
    """

    def __init__(self, base_layer: nn.Linear, ctx: BatchContext, index: int, lora_A: torch.Tensor,
                 lora_Bt: torch.Tensor, scaling: torch.Tensor) -> None:
        super().__init__()
        num_slots, max_rank, in_f = lora_A.shape
        if in_f != base_layer.in_features or lora_Bt.shape != (num_slots, max_rank, base_layer.out_features):
            raise ValueError("pool views do not match the base layer's shape")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.index = index
        self.max_rank = max_rank
        self._ctx = ctx
        self.lora_A = lora_A  # [K, r_max, in]
        self.lora_Bt = lora_Bt  # [K, r_max, out]
        self.scaling = scaling  # [K]
        self.slot_rank = [0] * num_slots
        self.slot_scale = [0.0] * num_slots
        self.group = None  # `groups.SharedInputGroup`: decode steps and CUDA prefill share launches with siblings
        self.plain = type(base_layer) is nn.Linear  # exactly nn.Linear: its GEMM can accumulate into a delta

    @property
    def lora_B(self) -> torch.Tensor:
        """``[K, out, r_max]`` view of the transposed store (see `..lora_ops`)."""
        return self.lora_Bt.transpose(1, 2)

    # -- slot management (cold path) -------------------------------------
    def forget_slot(self, slot: int) -> None:
        """Mark the slot empty; the owner zeroes the memory (one memset for all layers)."""
        self.slot_rank[slot] = 0
        self.slot_scale[slot] = 0.0

    def write_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float, non_blocking: bool = False) -> None:
        """Copy ``a=[r,in]`` and ``b=[out,r]`` into an already zeroed slot."""
        r = a.shape[0]
        self.lora_A[slot, :r].copy_(a, non_blocking=non_blocking)
        self.lora_Bt[slot, :r].copy_(b.t(), non_blocking=non_blocking)
        self.mark_slot(slot, r, scale)

    def mark_slot(self, slot: int, rank: int, scale: float) -> None:
        """The slot now holds rank-`rank` weights (already written into `lora_A`/`lora_Bt`) at `scale`."""
        self.scaling[slot].fill_(scale)
        self.slot_rank[slot] = rank
        self.slot_scale[slot] = float(scale)

    # -- hot path -----------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = self._ctx
        if ctx.slots is None:
            return self.base_layer(x, *args, **kwargs)
        return route(self, x, ctx, args, kwargs).run(self, x, ctx, args, kwargs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={self.lora_A.shape[0]}, r_max={self.max_rank}"
