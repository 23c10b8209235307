"""Linears that read the same input get their LoRA from one group launch.

Why, decode: under a CUDA graph a decode step's LoRA cost is the latency of its
small kernels (bench/RESULTS.md), two per target linear if done naively — 14 per
Llama layer.
q/k/v read the same normed hidden state and so do gate/up, so one shrink can
serve the whole group; and the expand is fused into each member's GEMM, which
then runs in Triton instead of cuBLAS (`kernels.group_decode_linears`: as fast
as cuBLAS at these skinny shapes, the expand a small addition to its epilogue).
A Llama layer's LoRA becomes 4 launches (one shrink per q/k/v, o, gate/up,
down), and with PDL the members stream their weights while the shrink runs.
Linears with a bias keep cuBLAS: one shrink and one expand launch per group
(`kernels.group_deltas_triton`), the base GEMMs accumulating into the deltas
(beta = 1, `lora_ops.base_plus_delta`).

Why, prefill (eager, CUDA): there LoRA costs memory traffic, not launches. The
torch path gathers every row's A and B per linear (4 small launches each) and
reads the layer input once per member; the group kernels read each row's
adapter straight from the pool and the input once per group, then write each
member's delta once for its base GEMM to accumulate into.

Which batches use it (`SharedInputGroup.rank_for`): a static batch's one-token
forward (`BatchContext.kernel_rank` set: the graph-captured decode step), and
an eager forward of more than one token per row on CUDA (prefill) whose rows
use more than one slot, unless the engine's `lora_backend` is ``torch``; ``triton`` also
sends CPU prefill through the kernels (Triton's interpreter, for tests; see `backend`).
Everything else takes the layer's own path: one slot on every row is two plain
cuBLAS GEMMs there, which beat the group kernels (bench/RESULTS.md). The first member a forward calls computes the whole group for that input
tensor; the others find the result in the batch context's `group_outputs`, keyed by
the input tensor's identity (`context.GroupOutputs` holds the tensor, so its identity
cannot be reused while cached). The entry is dropped once every member has taken its
delta, so a prefill's full-width deltas live no longer than the members' outputs.

A Llama-style MLP's gate/up group has one more entry point, `SharedInputGroup.gated_act`:
its prefill (any adapter mix) adds both deltas inside the activation instead, called by the
MLP's replaced forward (`gated_mlp`), so those two members never reach `output` in prefill.

Owned by the engine's thread, like the layers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..kernels.triton_lora import GROUPED_MAX_ROWS, MAX_RANK  # plain Python: needs neither triton nor CUDA
from .. import lora_ops as ops
from .context import BatchContext, GroupOutputs

if TYPE_CHECKING:
    from .layer import MultiLoraLinear

# Captured one-token forwards of at most this many rows run the members' GEMMs in Triton with the
# expand fused in (`decode_linear_lora_kernel`, tuned at 32 rows); wider ones (mixed steps: decode
# rows plus prompt chunks) keep cuBLAS and add the group's deltas (`group_deltas_triton`): the
# fused GEMM's one row tile grows with the rows, and at 96 rows it cost several cuBLAS GEMMs
# (bench/step_bench.py, mode mixed-fused)
FUSED_DECODE_MAX_ROWS = 32

# Sibling linears (same parent module) that read one input in Llama-style blocks.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputGroup:
    """The wrapped linears of one group and where their adapters sit in the pool row."""

    def __init__(self, key: int, layers: "Sequence[MultiLoraLinear]", pool: torch.Tensor, scales: torch.Tensor,
                 decode: bool = True, prefill: bool = True, fused: bool = True) -> None:
        from ..kernels.triton_lora import GroupMember

        self.id = key  # index in the model's group list: the key of its batch-context entries
        self.layers = tuple(layers)
        self.in_features = layers[0].in_features
        self.pool = pool
        self.scales = scales
        self.decode = decode
        self.prefill = prefill
        # decode steps through `kernels.group_decode_linears` (the members' GEMMs in Triton, the
        # expand fused in); not for linears with a bias, which keep cuBLAS + the expand launch
        self.fused = fused and all(l.base_layer.bias is None for l in layers)
        el = pool.element_size()
        base = pool.data_ptr()
        self.members = tuple(
            GroupMember(a_off=(l.lora_A.data_ptr() - base) // el, b_off=(l.lora_Bt.data_ptr() - base) // el,
                        out=l.out_features, scale_row=l.index) for l in layers)

    def rank_for(self, x: torch.Tensor, ctx: BatchContext) -> int | None:
        """The kernel rank this forward runs the group at; None when the group launches do not
        serve it (the layer's own path does), 0 when no member has an adapter for any row."""
        if x.dim() != 3 or x.shape[1] == 0:
            return None
        if ctx.kernel_rank is not None:  # static batch: graph-captured decode step
            if self.decode and x.shape[1] == 1 and x.shape[0] <= GROUPED_MAX_ROWS:
                return ctx.kernel_rank
            return None
        if (not self.prefill or x.shape[1] == 1 or len(ctx.unique) == 1 or x.shape[0] != ctx.slots.shape[0]
                or not ctx.backend.prefill_groups(x)):
            return None  # one slot on every row: the layer's two plain GEMMs are faster; rows that do
            # not match the slots (beam search): the layer's path refuses them
        return self._prefill_rank(ctx)

    def _prefill_rank(self, ctx: BatchContext) -> int | None:
        """The largest rank any member has for any slot of the batch (0: none), None over the
        kernels' limit; computed once per batch."""
        rank = ctx.group_ranks.get(self.id)
        if rank is None:
            rank = ctx.group_ranks[self.id] = max(l.slot_rank[s] for l in self.layers for s in ctx.unique)
        return rank if rank <= MAX_RANK else None

    def gated_act(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """``silu(gate(x)) * up(x)`` with both members' LoRA (this group is an MLP's gate/up, see
        `gated_mlp`), or None where the caller must run the MLP's own forward: a batch that is no
        eager multi-token forward through the Triton kernels, or whose rows use no adapter here.
        Unlike `rank_for` this serves one slot on every row too: fusing saves the delta traffic
        whatever the adapter mix."""
        if (not self.prefill or ctx.slots is None or ctx.kernel_rank is not None or x.dim() != 3
                or x.shape[1] <= 1 or x.shape[0] != ctx.slots.shape[0] or torch.compiler.is_compiling()
                or not ctx.backend.prefill_groups(x)):
            return None  # rows that do not match the slots (beam search): the layers refuse them
        rank = self._prefill_rank(ctx)
        if not rank:
            return None
        kernels = ctx.backend.kernels

        gate, up = self.layers
        x = x if x.stride(-1) == 1 else x.contiguous()
        g = torch.nn.functional.linear(x, gate.base_layer.weight)
        u = torch.nn.functional.linear(x, up.base_layer.weight)
        return kernels.group_gated_act(x, g, u, self.pool, self.scales, ctx.slots, self.members, self.in_features,
                                       rank)

    def output(self, layer: "MultiLoraLinear", x: torch.Tensor, ctx: BatchContext, rank: int) -> torch.Tensor:
        """``[N, S, out]`` output (base + LoRA) of member `layer` for input ``x [N, S, in]``; the
        whole group runs on the first member's call for this `x`."""
        cached = ctx.group_outputs.get(self.id)
        if cached is None or cached.x is not x:
            cached = ctx.group_outputs[self.id] = GroupOutputs(x, self._outputs(x, ctx, rank), len(self.layers))
        cached.pending -= 1
        if cached.pending == 0:  # every member has its output: do not keep them alive in the cache
            del ctx.group_outputs[self.id]
        return cached.outputs[self.layers.index(layer)]

    def _outputs(self, x: torch.Tensor, ctx: BatchContext, rank: int) -> list[torch.Tensor]:
        kernels = ctx.backend.kernels

        if x.shape[1] == 1 and ctx.kernel_rank is not None and self.fused and x.shape[0] <= FUSED_DECODE_MAX_ROWS:
            # decode step: one shrink, then each member's GEMM with its expand in the epilogue
            n = x.shape[0]
            ys = kernels.group_decode_linears(x.reshape(n, self.in_features), self.pool, self.scales, ctx.slots,
                                              self.members, [l.base_layer.weight for l in self.layers],
                                              self.in_features, rank, pdl=ctx.backend.pdl)
            return [y.view(n, 1, y.shape[1]) for y in ys]
        xin = x.reshape(x.shape[0], self.in_features) if x.shape[1] == 1 else x
        deltas = kernels.group_deltas_triton(xin, self.pool, self.scales, ctx.slots, self.members,
                                             self.in_features, rank, pdl=ctx.backend.pdl)
        # each member's base GEMM accumulates into its delta (beta = 1): the delta is written
        # once and read once, never added in a separate pass
        return [ops.base_plus_delta(d.view(*x.shape[:-1], l.out_features), x, l.base_layer.weight,
                                    l.base_layer.bias) for d, l in zip(deltas, self.layers)]


def build_groups(layers: "dict[str, MultiLoraLinear]", pool: torch.Tensor, scales: torch.Tensor,
                 decode: bool = True, prefill: bool = True, fused: bool = True) -> list[SharedInputGroup]:
    """Attach a `SharedInputGroup` to every wrapped linear: q/k/v and gate/up siblings
    (same parent module, same input width) together, any other linear alone. `decode` /
    `prefill` say which batches the group launches serve (see the module docstring)."""
    by_parent: dict[str, dict[str, "MultiLoraLinear"]] = {}
    for name, layer in layers.items():
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = layer
    groups: list[SharedInputGroup] = []
    for children in by_parent.values():
        taken: set[str] = set()
        sets = [[leaf for leaf in names if leaf in children] for names in SHARED_INPUT]
        sets += [[leaf] for leaf in children if not any(leaf in names for names in SHARED_INPUT)]
        for leaves in sets:
            members = [children[leaf] for leaf in leaves if leaf not in taken]
            if not members:
                continue
            if len({m.in_features for m in members}) != 1:  # not one input after all: each alone
                for m in members:
                    _attach(groups, [m], pool, scales, decode, prefill, fused)
            else:
                _attach(groups, members, pool, scales, decode, prefill, fused)
            taken.update(leaves)
    return groups


def _attach(groups: list[SharedInputGroup], members: "list[MultiLoraLinear]", pool: torch.Tensor,
            scales: torch.Tensor, decode: bool, prefill: bool, fused: bool) -> None:
    group = SharedInputGroup(len(groups), members, pool, scales, decode, prefill, fused)
    groups.append(group)
    for m in members:
        m.group = group
