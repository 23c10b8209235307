"""Linears that read the same input get their decode LoRA deltas from one pair of kernel launches.

Why: under a CUDA graph a decode step's LoRA cost is the latency of its small
kernels, two per target linear (a shrink, then an expand) — 14 per Llama
layer, each ~4-6 µs on an H100 whatever the adapter mix (bench/KERNELS.md).
q/k/v read the same normed hidden state and so do gate/up, so one shrink and
one expand launch can compute all of their deltas (`kernels.group_deltas_triton`);
the base GEMM of each member then adds its delta for free (beta = 1,
`ops.base_plus_delta`). A Llama layer's LoRA becomes 8 launches instead of 14
(q/k/v, o, gate/up, down: two each).

Only static batches use it (`BatchContext.kernel_rank` set: the graph-captured
decode step), and only for one token per row. The first member a forward calls
computes the whole group for that input tensor; the others find the result in
the batch context's plan cache, keyed by the input tensor's identity (the
cache holds the tensor, so its identity cannot be reused while cached; the
cache is dropped when the batch context changes).

Owned by the engine's thread, like the layers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .context import BatchContext

if TYPE_CHECKING:
    from .layer import MultiLoraLinear

# Sibling linears (same parent module) that read one input in Llama-style blocks.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class DecodeGroup:
    """The wrapped linears of one group and where their adapters sit in the pool row."""

    def __init__(self, key: int, layers: "Sequence[MultiLoraLinear]", pool: torch.Tensor, scales: torch.Tensor) -> None:
        from ..kernels.triton_lora import GroupMember

        self.key = ("decode_group", key)
        self.layers = tuple(layers)
        self.in_features = layers[0].in_features
        self.pool = pool
        self.scales = scales
        el = pool.element_size()
        base = pool.data_ptr()
        self.members = tuple(
            GroupMember(a_off=(l.lora_A.data_ptr() - base) // el, b_off=(l.lora_Bt.data_ptr() - base) // el,
                        out=l.out_features, scale_row=l.index) for l in layers)

    def delta(self, layer: "MultiLoraLinear", x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """``[N, 1, out]`` delta of `layer` for input ``x [N, 1, in]``; the group's launch runs
        on the first member's call for this `x`."""
        cached = ctx.plans.get(self.key)
        if cached is None or cached[0] is not x:
            from .. import kernels

            x2 = x.reshape(x.shape[0], self.in_features)
            deltas = kernels.group_deltas_triton(x2, self.pool, self.scales, ctx.slots, self.members,
                                                 self.in_features, ctx.kernel_rank)
            cached = ctx.plans[self.key] = (x, deltas)
        return cached[1][self.layers.index(layer)].view(x.shape[0], 1, layer.out_features)


def build_groups(layers: "dict[str, MultiLoraLinear]", pool: torch.Tensor,
                 scales: torch.Tensor) -> list[DecodeGroup]:
    """Attach a `DecodeGroup` to every wrapped linear: q/k/v and gate/up siblings
    (same parent module, same input width) together, any other linear alone."""
    by_parent: dict[str, dict[str, "MultiLoraLinear"]] = {}
    for name, layer in layers.items():
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = layer
    groups: list[DecodeGroup] = []
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
                    _attach(groups, [m], pool, scales)
            else:
                _attach(groups, members, pool, scales)
            taken.update(leaves)
    return groups


def _attach(groups: list[DecodeGroup], members: "list[MultiLoraLinear]", pool: torch.Tensor,
            scales: torch.Tensor) -> None:
    group = DecodeGroup(len(groups), members, pool, scales)
    groups.append(group)
    for m in members:
        m.group = group
