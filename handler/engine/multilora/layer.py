"""A target linear layer with a preallocated pool of adapter slots.

Why preallocated: loading an adapter must not create modules, parameters or
allocate (that is what makes PEFT's load/switch slow and its memory drift);
it only copies into a free slot. Slot 0 stays all zeros so base-model rows
ride in the same batch.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .context import BatchContext

_NO_PLAN = object()


class _KernelPlan:
    """Mixed batch served by the Triton kernel (`handler.engine.kernels`): no gather, only the rank."""

    __slots__ = ("rank",)

    def __init__(self, rank: int) -> None:
        self.rank = rank


class MultiLoraLinear(nn.Module):
    """Wraps an `nn.Linear`; adds ``scale[slot] * x A[slot]^T B[slot]^T`` per row.

    The pool tensors are *views* into one ``[K, P]`` buffer owned by
    `MultiLoraModel` (slot-major: all of slot k's weights, in every layer, are
    one contiguous row), so freeing a slot is a single memset and nothing is
    allocated per adapter. They are plain attributes, not buffers: moving the
    module with `.to()` would split them from the shared buffer, so move the
    model *before* wrapping it. Python mirrors of per-slot rank and scaling let
    the hot path decide what to do without reading tensors (no device sync).
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

    @property
    def lora_B(self) -> torch.Tensor:
        """``[K, out, r_max]`` view of the transposed store (see `ops`)."""
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
        self.scaling[slot].fill_(scale)
        self.slot_rank[slot] = r
        self.slot_scale[slot] = float(scale)

    # -- hot path -----------------------------------------------------------
    def _plan(self, ctx: BatchContext, kernel: bool):
        if ctx.kernel_rank is not None:  # static batch: the plan must not depend on today's adapters
            return _KernelPlan(ctx.kernel_rank)
        used = [s for s in ctx.unique if self.slot_rank[s]]
        if not used:
            return None
        r = max(self.slot_rank[s] for s in used)
        if kernel and r <= 64:  # one fused shrink/expand pair serves one adapter or many
            return _KernelPlan(r)
        if len(ctx.unique) == 1:
            s = used[0]
            return (self.lora_A[s, :r], self.lora_Bt[s, :r], self.slot_scale[s])
        return ops.prepare_mixed(ctx.slots, self.lora_A, self.lora_B, self.scaling, rank=r, workspace=ctx.workspace)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = self._ctx
        if ctx.slots is None:
            return self.base_layer(x, *args, **kwargs)
        group = self.group
        # graph-captured decode step, or CUDA prefill: this linear's output comes from its group
        # (shared with q/k/v or gate/up siblings: one LoRA launch pair for all of them). An eager
        # one-token forward never is, and is the hot path on a CPU: one cheap test skips the rest.
        if (group is not None and (ctx.kernel_rank is not None or (x.dim() == 3 and x.shape[1] > 1))
                and not args and not kwargs and type(self.base_layer) is nn.Linear):
            rank = group.rank_for(x, ctx)
            if rank == 0:
                return self.base_layer(x)
            if rank is not None:
                return group.output(self, x, ctx, rank)
        kernel = ctx.kernel_rank is not None or ctx.backend.eager_layer_kernels(x)
        key = -1 - self.index if kernel else self.index  # eager and captured forwards keep their own plans
        plan = ctx.plans.get(key, _NO_PLAN)
        if plan is _NO_PLAN:
            plan = ctx.plans[key] = self._plan(ctx, kernel)
        if plan is None:
            return self.base_layer(x, *args, **kwargs)
        if type(plan) is tuple:
            delta = ops.uniform_delta(x, *plan)
        else:
            if x.dim() != 3 or x.shape[0] != ctx.slots.shape[0]:
                from ..errors import BatchShapeError

                raise BatchShapeError(f"batch has {x.shape[0] if x.dim() else 0} rows but {ctx.slots.shape[0]} "
                                      "adapter names were given (beam search / num_return_sequences are not "
                                      "supported with mixed adapters)")
            if type(plan) is _KernelPlan:  # GPU: the kernel adds into the base output in place
                out = self.base_layer(x, *args, **kwargs)
                return ctx.backend.kernels.add_mixed_triton_(out, x, ctx.slots, self.lora_A, self.lora_Bt,
                                                             self.scaling, plan.rank, pdl=ctx.backend.pdl)
            delta = ops.mixed_delta(x, plan)
        if args or kwargs or type(self.base_layer) is not nn.Linear:
            return self.base_layer(x, *args, **kwargs) + delta
        return ops.base_plus_delta(delta, x, self.base_layer.weight, self.base_layer.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={self.lora_A.shape[0]}, r_max={self.max_rank}"
