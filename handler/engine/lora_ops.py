"""The LoRA delta for a batch whose rows use different adapter slots.

This is the one place the math lives, so a GPU kernel (Punica-style
shrink/expand, `handler/engine/kernels/`) can replace it without touching the
layers. Pure torch, importing nothing of the engine: the layers (`multilora`) and the
kernels' CPU fallback (`kernels.triton_lora`) both use it, and neither imports the other
for it. Pool layout (what every backend receives):

* ``A``: ``[K, r, in]``  - slot k's ``lora_A.weight`` zero-padded to r rows.
* ``B``: ``[K, out, r]`` - slot k's ``lora_B.weight`` zero-padded to r columns.
  The pool *stores* B transposed (``Bt = [K, r, out]``, contiguous) and hands
  out ``B = Bt.transpose(1, 2)``: a row's rank slice is then one contiguous
  block, which both the gather and the GEMM prefer. Kernels must honour strides.
* ``scaling``: ``[K]`` - ``lora_alpha / r`` (or ``/ sqrt(r)`` for rslora), 0 for empty slots.
* ``slots``: ``[N]`` int64, one slot per batch row; slot 0 is all zeros (base model).

Entry points:

* :func:`lora_delta` - functional, ``delta[N, S, out]``; the contract a kernel
  must meet, used by tests against :func:`lora_delta_reference`.
* :func:`prepare_mixed` + :func:`add_mixed_` - the split the layers use. Slot
  indices are fixed for a whole ``generate`` call, so the per-row gather of A
  and B happens once per call (``prepare``) and each prefill/decode step only
  runs two batched GEMMs that add into the base output in place (``add``): no
  per-step gather, no per-step delta allocation.
* :func:`group_by_slot` + :func:`by_slot_delta` - for a batch that is one forward of one
  token per row (a continuous-batching decode step is a new batch every step, so a
  per-call gather would run every step): rows grouped by slot once, each slot's weights
  read in place in the pool.

On CUDA the layers use the Triton kernel `handler.engine.kernels.add_mixed_triton_`
(same pool layout, reads each row's slot inside the kernel, so no gather at
all) when it is available and ranks are <= 64; the engine's ``lora_backend: torch``
forces this module's path everywhere (`multilora.backend`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Workspace(Protocol):
    """Memory to gather into (`multilora.context.GatherWorkspace`)."""

    def take(self, shape: tuple[int, ...]) -> torch.Tensor: ...


@dataclass
class MixedPlan:
    """Per-row weights of one layer for one batch (rows may repeat slots)."""

    a_rows: torch.Tensor  # [N, r, in]
    bt_rows: torch.Tensor  # [N, r, out], already multiplied by the row's scaling


def prepare_mixed(slots: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor,
                  rank: int | None = None, workspace: Workspace | None = None) -> MixedPlan:
    """Gather each row's adapter once. ``rank`` trims the zero padding every
    slot in the batch shares (exact: padded rows/columns are zero). The row's
    scaling is folded into its gathered B here, once per call, which saves an
    op per layer per step (fp32 results differ from PEFT's order by rounding only).
    With a ``workspace`` the rows are gathered into its reused memory (valid until
    its next rewind) instead of fresh tensors."""
    r = A.shape[1] if rank is None else rank
    a_src, bt_src = A[:, :r], B.transpose(1, 2)[:, :r]
    n = slots.shape[0]
    if workspace is None:
        a_rows, bt_rows = a_src.index_select(0, slots), bt_src.index_select(0, slots)
    else:
        a_rows = torch.index_select(a_src, 0, slots, out=workspace.take((n, r, a_src.shape[2])))
        bt_rows = torch.index_select(bt_src, 0, slots, out=workspace.take((n, r, bt_src.shape[2])))
    bt_rows.mul_(scaling.index_select(0, slots).view(-1, 1, 1))
    return MixedPlan(a_rows=a_rows, bt_rows=bt_rows)


@dataclass
class SlotGroups:
    """A batch's adapter rows grouped by slot, the layout `by_slot_delta` computes in: slot
    ``lo + g`` has its rows at places ``0 .. width - 1`` of group g (the rest of a group is padding,
    zeros in, never read out). Depends only on the rows' slots: built once per batch, shared by
    every layer."""

    lo: int  # the lowest adapter slot of the batch
    count: int  # slots lo .. lo + count - 1 (the highest adapter slot's), used or not
    width: int  # most rows on one slot
    group: torch.Tensor  # [M] long: slot - lo of each adapter row
    place: torch.Tensor  # [M] long: its place in its group
    flat: torch.Tensor  # [M] long: group * width + place, its row in the flattened groups
    rows: torch.Tensor | None  # [M] long: which batch rows those are; None: every row has an adapter


def group_by_slot(slots: list[int], device: torch.device | None = None) -> SlotGroups | None:
    """`SlotGroups` of a batch (one slot per row, 0 = base); None when no row has an adapter."""
    adapter_rows = [i for i, s in enumerate(slots) if s]
    if not adapter_rows:
        return None
    lo = min(slots[i] for i in adapter_rows)
    seen: dict[int, int] = {}
    group, place = [], []
    for i in adapter_rows:
        g = slots[i] - lo
        group.append(g)
        place.append(seen.get(g, 0))
        seen[g] = place[-1] + 1
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    width = max(seen.values())
    return SlotGroups(lo=lo, count=max(group) + 1, width=width, group=as_long(group), place=as_long(place),
                      flat=as_long([g * width + p for g, p in zip(group, place)]),
                      rows=None if len(adapter_rows) == len(slots) else as_long(adapter_rows))


def by_slot_delta(x: torch.Tensor, groups: SlotGroups, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor,
                  rank: int | None = None) -> torch.Tensor:
    """``delta[n] = scale[n] * (x[n] @ A[n].T) @ B[n].T`` as a fresh tensor, reading each slot's
    weights in place in the pool (batched GEMMs over the pool's slots ``lo .. lo + count - 1``,
    the rows placed by `groups`; nothing gathered).

    Why: in a forward of one token per row (a decode step) each row's weights are read once, so
    gathering them per row first (`prepare_mixed`) costs more memory traffic than the LoRA
    GEMMs themselves, on every step; here each slot is read once, however many rows use it.
    Isolation: a row is multiplied by its own slot's weights only (a slot in the range that no row
    uses computes on zeros into padding that is never read), so even non-finite weights in one
    slot cannot reach another slot's rows."""
    n, s, d = x.shape
    r = A.shape[1] if rank is None else rank
    c, w = groups.count, groups.width
    a = A[groups.lo:groups.lo + c, :r]  # [C, r, in] views of the pool: batched GEMMs honour its slot stride
    bt = B.transpose(1, 2)[groups.lo:groups.lo + c, :r]  # [C, r, out]
    out = bt.shape[2]
    src = x if groups.rows is None else x.index_select(0, groups.rows)
    xg = x.new_zeros(c * w, s * d).index_copy_(0, groups.flat, src.reshape(-1, s * d))
    xa = torch.bmm(xg.view(c, w * s, d), a.transpose(1, 2))  # [C, W*S, r]
    xa.mul_(scaling[groups.lo:groups.lo + c].view(c, 1, 1))
    y = torch.bmm(xa, bt).view(c * w, s * out).index_select(0, groups.flat).view(-1, s, out)  # [M, S, out]
    if groups.rows is None:
        return y
    return x.new_zeros(n, s, out).index_copy_(0, groups.rows, y)


def add_mixed_(out: torch.Tensor, x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
    """``out[n] += scale[n] * (x[n] @ A[n].T) @ B[n].T`` for 3-D ``x``/``out``; in place."""
    xa = torch.bmm(x, plan.a_rows.transpose(1, 2))  # [N, S, r]; BLAS reads A transposed, no copy
    return out.baddbmm_(xa, plan.bt_rows)


def add_uniform_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: float) -> torch.Tensor:
    """Every row uses the same slot: two plain GEMMs (``a`` = ``[r, in]``, ``bt`` = ``[r, out]``)."""
    xa = torch.matmul(x, a.t())
    flat = out.view(-1, out.shape[-1])
    flat.addmm_(xa.reshape(-1, xa.shape[-1]), bt, alpha=scale)
    return out


def base_plus_delta(delta: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``delta + x @ W.T (+ bias)`` with the base GEMM accumulating *into* ``delta``.

    Why: adding a delta after the base matmul costs one more read+write pass over
    the whole output, which in prefill is most of LoRA's cost on a CPU. A GEMM
    with beta=1 reads its C tile by tile while it computes, so the LoRA part
    costs only writing ``delta`` once.
    """
    out2d = delta.view(-1, delta.shape[-1])
    out2d.addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        out2d.add_(bias)
    return delta


def mixed_delta(x: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
    """``delta[n] = scale[n] * (x[n] @ A[n].T) @ B[n].T`` as a fresh tensor."""
    return torch.bmm(torch.bmm(x, plan.a_rows.transpose(1, 2)), plan.bt_rows)


def uniform_delta(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: float) -> torch.Tensor:
    """Same slot on every row: two plain GEMMs, scaling applied to the small ``x @ A.T``."""
    xa = torch.matmul(x, a.t())
    xa.mul_(scale)
    return torch.matmul(xa, bt)


def lora_delta(x: torch.Tensor, slots: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               scaling: torch.Tensor) -> torch.Tensor:
    """``delta[N, S, out]`` for ``x[N, S, in]``; row n uses slot ``slots[n]``."""
    out = x.new_zeros(*x.shape[:-1], B.shape[1])
    return add_mixed_(out, x, prepare_mixed(slots, A, B, scaling))


def lora_delta_reference(x: torch.Tensor, slots: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         scaling: torch.Tensor) -> torch.Tensor:
    """Oracle shaped like PEFT's ``LoraLayer._mixed_batch_forward``: one sub-batch
    per distinct slot, ``lora_B(lora_A(x)) * scaling``. Slow on purpose; tests only."""
    out = x.new_zeros(*x.shape[:-1], B.shape[1])
    for slot in sorted(set(slots.tolist())):
        if slot == 0:
            continue
        rows = [i for i, s in enumerate(slots.tolist()) if s == slot]
        sub = x[rows]
        out[rows] += torch.nn.functional.linear(torch.nn.functional.linear(sub, A[slot]), B[slot]) * scaling[slot]
    return out
