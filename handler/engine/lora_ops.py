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

Two entry points:

* :func:`lora_delta` - functional, ``delta[N, S, out]``; the contract a kernel
  must meet, used by tests against :func:`lora_delta_reference`.
* :func:`prepare_mixed` + :func:`add_mixed_` - the split the layers use. Slot
  indices are fixed for a whole ``generate`` call, so the per-row gather of A
  and B happens once per call (``prepare``) and each prefill/decode step only
  runs two batched GEMMs that add into the base output in place (``add``): no
  per-step gather, no per-step delta allocation.

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
