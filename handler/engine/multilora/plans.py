"""How one forward of one `MultiLoraLinear` gets its LoRA: the plan kinds, and `route`, the one
place the choice is made.

Plans (one class per kind, each knows how to run itself):

* `BaseOnly` — no row of the batch has an adapter on this layer: the base linear alone.
* `UniformPlan` — every row uses the same slot: two plain GEMMs on that slot's weights.
* `GatheredPlan` — rows use different slots, torch path: each row's adapter gathered once per
  batch (`lora_ops.prepare_mixed`), then two batched GEMMs per forward.
* `BySlotPlan` — rows use different slots, torch path on a CPU, in a batch whose first forward is one
  token per row (a stepper's decode step: every step is a new batch): each slot's weights read in
  place in the pool, rows grouped by slot (`lora_ops.by_slot_delta`); nothing gathered per row.
* `KernelPlan` — rows' slots read inside the Triton kernel (`handler.engine.kernels`) at `rank`;
  nothing gathered. A static batch (graph-captured decode) always takes it, at the batch's rank.
* `GroupPlan` — this linear's output comes from its `groups.SharedInputGroup` (one launch pair
  shared with its q/k/v or gate/up siblings); decided per forward, never cached.

Isolation rests on this module: a plan that serves several rows reads each row's slot (`ctx.slots`)
or gathers by it; `UniformPlan` exists only when the batch has exactly one slot. Per-layer plans
are cached in the batch context (`layer_plans` for eager forwards, `kernel_plans` for kernel
forwards) and dropped when the batch ends or an adapter is loaded/deleted.

Owned by the engine's thread, like the layers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import BatchShapeError
from ..kernels.triton_lora import MAX_RANK as KERNEL_MAX_RANK  # plain Python: needs neither triton nor CUDA
from .. import lora_ops as ops
from .context import BatchContext

if TYPE_CHECKING:
    from .groups import SharedInputGroup
    from .layer import MultiLoraLinear


class LayerPlan:
    """What one layer runs for the batch in flight."""

    __slots__ = ()

    def run(self, layer: "MultiLoraLinear", x: torch.Tensor, ctx: BatchContext, args: tuple,
            kwargs: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Tensors the plan holds (what the batch context keeps alive while it is cached)."""
        return ()


class BaseOnly(LayerPlan):
    __slots__ = ()

    def run(self, layer, x, ctx, args, kwargs):
        return layer.base_layer(x, *args, **kwargs)


BASE_ONLY = BaseOnly()


class UniformPlan(LayerPlan):
    """Every row of the batch uses one slot: ``a [r, in]``, ``bt [r, out]`` are views into it."""

    __slots__ = ("a", "bt", "scale")

    def __init__(self, a: torch.Tensor, bt: torch.Tensor, scale: float) -> None:
        self.a, self.bt, self.scale = a, bt, scale

    def run(self, layer, x, ctx, args, kwargs):
        return _plus_base(layer, x, ops.uniform_delta(x, self.a, self.bt, self.scale), args, kwargs)

    def tensors(self):
        return (self.a, self.bt)


class GatheredPlan(LayerPlan):
    """Rows use different slots (torch path): their adapters gathered once for the batch."""

    __slots__ = ("rows",)

    def __init__(self, rows: ops.MixedPlan) -> None:
        self.rows = rows

    def run(self, layer, x, ctx, args, kwargs):
        _check_rows(x, ctx)
        return _plus_base(layer, x, ops.mixed_delta(x, self.rows), args, kwargs)

    def tensors(self):
        return (self.rows.a_rows, self.rows.bt_rows)


class BySlotPlan(LayerPlan):
    """Rows use different slots (torch path), read per slot in place: no per-row gather."""

    __slots__ = ("groups", "rank")

    def __init__(self, groups: ops.SlotGroups, rank: int) -> None:
        self.groups, self.rank = groups, rank

    def run(self, layer, x, ctx, args, kwargs):
        _check_rows(x, ctx)
        delta = ops.by_slot_delta(x, self.groups, layer.lora_A, layer.lora_B, layer.scaling, rank=self.rank)
        return _plus_base(layer, x, delta, args, kwargs)


class KernelPlan(LayerPlan):
    """The Triton kernel adds each row's adapter (read by its slot on the device) into the base output."""

    __slots__ = ("rank",)

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def run(self, layer, x, ctx, args, kwargs):
        _check_rows(x, ctx)
        out = layer.base_layer(x, *args, **kwargs)
        return ctx.backend.kernels.add_mixed_triton_(out, x, ctx.slots, layer.lora_A, layer.lora_Bt, layer.scaling,
                                                     self.rank, pdl=ctx.backend.pdl)


class GroupPlan(LayerPlan):
    """The layer's output is its group's (the whole group runs on the first member's call)."""

    __slots__ = ("group", "rank")

    def __init__(self, group: "SharedInputGroup", rank: int) -> None:
        self.group, self.rank = group, rank

    def run(self, layer, x, ctx, args, kwargs):
        return self.group.output(layer, x, ctx, self.rank)


def route(layer: "MultiLoraLinear", x: torch.Tensor, ctx: BatchContext, args: tuple,
          kwargs: dict[str, Any]) -> LayerPlan:
    """The plan for this forward of `layer` inside a batch (``ctx.slots`` set)."""
    group = layer.group
    # graph-captured decode step, or a multi-token forward: the group may serve it (shared with
    # q/k/v or gate/up siblings: one LoRA launch pair for all of them). An eager one-token forward
    # never is, and is the hot path on a CPU: one cheap test skips the rest.
    if (group is not None and (ctx.kernel_rank is not None or (x.dim() == 3 and x.shape[1] > 1))
            and not args and not kwargs and layer.plain):
        rank = group.rank_for(x, ctx)
        if rank == 0:
            return BASE_ONLY
        if rank is not None:
            return GroupPlan(group, rank)
    kernel = ctx.kernel_rank is not None or ctx.backend.eager_layer_kernels(x)
    cache = ctx.kernel_plans if kernel else ctx.layer_plans  # eager and captured forwards keep their own
    plan = cache.get(layer.index)
    if plan is None:
        # BySlotPlan on a CPU only: CUDA's eager one-token forwards keep the path the GPU tests and
        # graph comparisons were measured against (GatheredPlan)
        plan = cache[layer.index] = plan_layer(layer, ctx, kernel,
                                               one_token=x.dim() == 3 and x.shape[1] == 1 and not x.is_cuda)
    return plan


def plan_layer(layer: "MultiLoraLinear", ctx: BatchContext, kernel: bool, one_token: bool = False) -> LayerPlan:
    """The layer's plan for the whole batch; `kernel`: the forward runs through the Triton kernels;
    `one_token`: the batch's first forward of this layer has one token per row. Such a batch (a
    stepper's decode step, the whole batch) reads its rows' slots in place (`BySlotPlan`); one that
    starts with a prompt (`generate`) gathers its rows once and reuses them for every step after."""
    if ctx.kernel_rank is not None:  # static batch: the plan must not depend on today's adapters
        return KernelPlan(ctx.kernel_rank)
    used = [s for s in ctx.unique if layer.slot_rank[s]]
    if not used:
        return BASE_ONLY
    r = max(layer.slot_rank[s] for s in used)
    if kernel and r <= KERNEL_MAX_RANK:  # one fused shrink/expand pair serves one adapter or many
        return KernelPlan(r)
    if len(ctx.unique) == 1:
        s = used[0]
        return UniformPlan(layer.lora_A[s, :r], layer.lora_Bt[s, :r], layer.slot_scale[s])
    if one_token:
        if ctx.slot_groups is None:  # once per batch, shared by every layer
            ctx.slot_groups = ops.group_by_slot(ctx.slots.tolist(), ctx.slots.device)
        return BySlotPlan(ctx.slot_groups, r)
    return GatheredPlan(ops.prepare_mixed(ctx.slots, layer.lora_A, layer.lora_B, layer.scaling, rank=r,
                                          workspace=ctx.workspace))


def _check_rows(x: torch.Tensor, ctx: BatchContext) -> None:
    """A plan that reads per-row slots needs one row of `x` per slot (beam search multiplies rows)."""
    if x.dim() != 3 or x.shape[0] != ctx.slots.shape[0]:
        raise BatchShapeError(f"batch has {x.shape[0] if x.dim() else 0} rows but {ctx.slots.shape[0]} "
                              "adapter names were given (beam search / num_return_sequences are not "
                              "supported with mixed adapters)")


def _plus_base(layer: "MultiLoraLinear", x: torch.Tensor, delta: torch.Tensor, args: tuple,
               kwargs: dict[str, Any]) -> torch.Tensor:
    if args or kwargs or not layer.plain:
        return layer.base_layer(x, *args, **kwargs) + delta
    return ops.base_plus_delta(delta, x, layer.base_layer.weight, layer.base_layer.bias)


__all__ = ["LayerPlan", "BaseOnly", "BASE_ONLY", "UniformPlan", "GatheredPlan", "BySlotPlan", "KernelPlan", "GroupPlan", "route",
           "plan_layer"]
