"""Triton kernels for the mixed-adapter LoRA delta (Punica SGMV/BGMV style).

Imported lazily by :mod:`.triton_lora` (importing this module needs triton).
Math contract (see ``handler/engine/lora_ops.py``)::

    out[n, s] += scaling[slots[n]] * (x[n, s] @ A[slots[n]].T) @ Bt[slots[n]]

split into a *shrink* (``x @ A.T * scale`` -> fp32 ``[T, r]``, optionally as
``SPLIT`` partial sums over the ``in`` dimension) and an *expand* (sums the
partials, ``@ Bt``, adds into ``out`` in place). Slot 0 means "no adapter":
every program whose row has slot 0 returns before touching memory, and the
shrink leaves those rows of the partial buffer unwritten (the expand never
reads them).

Two layouts per stage:

* row layout (SGMV for prefill, BGMV for decode): grid ``(row, token-tile,
  k-split | out-tile)``; the row's slot is read once per program. With
  ``BLOCK_M == 1`` (decode) the math is a vector x matrix product on the CUDA
  cores; otherwise ``tl.dot`` on the tensor cores.
* grouped layout (decode, S == 1, N <= 128): grid ``(row, k-split | out-tile)``;
  only the program of the *first* row that uses a slot does work, for every
  row that shares the slot (a masked ``[BLOCK_N, ...]`` dot), so each distinct
  adapter's A and B are read once per step; the other programs exit at once.
  No sort, no host-side grouping: it reads the (tiny) slots vector.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_lora import INTERPRET as _INTERPRET

try:  # programmatic dependent launch (Hopper+); triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except Exception:  # pragma: no cover - older triton
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


# Triton's CPU interpreter multiplies bf16 operands of tl.dot wrongly (numpy
# has no bf16); under it, dots run in fp32. Compiled kernels are unaffected.
INTERPRET = tl.constexpr(_INTERPRET)  # Triton's own switch, read once (triton_lora.INTERPRET)

# The prefill group kernels take the chunk length ``S`` and the rank ``R`` (and the shrink its
# members' scaling rows ``S0..S2``, a layer index) as plain values, not as specialisation keys:
# Triton compiles one variant per key (``== 1``, ``% 16``), and prompt lengths vary per request,
# so specialising on them compiled kernels on the request path. The other integer arguments
# are the same for every layer of one shape or multiples of 16 at every length (strides and
# offsets of 16-aligned widths), so the variants left are the constexpr launch shapes, which
# `triton_lora.warm_prefill` compiles before serving.
PREFILL_UNSPECIALIZED = ["S", "R"]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _slot_group(slots_ptr, N, pid, BLOCK_N: tl.constexpr):
    """Row `pid`'s place among the batch's rows grouped by slot (one load for its own and all
    slots): the row offsets, its slot, which rows share it, and the first of them (the one
    program of the group that does the work; the others return)."""
    offs_n = tl.arange(0, BLOCK_N)
    all_slots = tl.load(slots_ptr + offs_n, mask=offs_n < N, other=-1).to(tl.int64)
    slot = tl.sum(tl.where(offs_n == pid, all_slots, 0), axis=0)
    same = all_slots == slot
    first = tl.min(tl.where(same, offs_n, BLOCK_N), axis=0)
    return offs_n, slot, same, first


@triton.jit
def _rows_shrink_tile(x_ptr, n, S, IN, R, K_PER_SPLIT, stride_xn, stride_xs, stride_ps, stride_pt,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """What one program of a per-row prefill shrink (grid ``(row, token-tile, k-split)``) covers:
    its token offsets and rank/k offsets with their masks, its k range, the row's x tile pointers,
    and the offsets of its partials ``p[split, n * S + token, r]`` (shared by `shrink_rows_kernel`
    and `group_shrink_rows_kernel`)."""
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, IN)
    x_rows = x_ptr + n * stride_xn + offs_m.to(tl.int64)[:, None] * stride_xs
    p_tile = pid_k * stride_ps + (n * S + offs_m)[:, None] * stride_pt + offs_r[None, :]
    return offs_m, offs_r, offs_k, offs_m < S, offs_r < R, k_start, k_end, x_rows, p_tile


@triton.jit
def shrink_rows_kernel(x_ptr, a_ptr, slots_ptr, scale_ptr, p_ptr,
                       S, IN, R, K_PER_SPLIT,
                       stride_xn, stride_xs, stride_ak, stride_ar, stride_ps, stride_pt,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                       IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # let the expand start its prologue (slots, B, out) while this runs
        gdc_launch_dependents()
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    if slot == 0:
        return
    offs_m, offs_r, offs_k, m_mask, r_mask, k_start, k_end, x_rows, p_tile = _rows_shrink_tile(
        x_ptr, n, S, IN, R, K_PER_SPLIT, stride_xn, stride_xs, stride_ps, stride_pt, BLOCK_M, BLOCK_K, BLOCK_R)
    a_rows = a_ptr + slot * stride_ak + offs_r[:, None] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_end
        a = tl.load(a_rows + k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(xt.to(tl.float32) * a.to(tl.float32), axis=1)[None, :]
        else:
            acc += _dot(xt, tl.trans(a), IEEE)
    acc = acc * tl.load(scale_ptr + slot).to(tl.float32)
    p = p_ptr + p_tile
    tl.store(p, acc, mask=m_mask[:, None])


@triton.jit
def shrink_grouped_kernel(x_ptr, a_ptr, slots_ptr, scale_ptr, p_ptr,
                          N, IN, R, K_PER_SPLIT,
                          stride_xn, stride_ak, stride_ar, stride_ps, stride_pt,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                          IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n, slot, same, first = _slot_group(slots_ptr, N, pid, BLOCK_N)
    if slot == 0:
        return
    if first != pid:
        return
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < R
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, IN)
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn
    a_rows = a_ptr + slot * stride_ak + offs_r[:, None] * stride_ar
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_end
        a = tl.load(a_rows + k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        xt = tl.load(x_rows + k[None, :], mask=same[:, None] & k_mask[None, :], other=0.0)
        acc += _dot(xt, tl.trans(a), IEEE)
    acc = acc * tl.load(scale_ptr + slot).to(tl.float32)
    p = p_ptr + pid_k * stride_ps + offs_n[:, None] * stride_pt + offs_r[None, :]
    tl.store(p, acc, mask=same[:, None])


@triton.jit
def expand_rows_kernel(out_ptr, p_ptr, bt_ptr, slots_ptr,
                       S, OUT, R,
                       stride_on, stride_os, stride_ps, stride_pt, stride_bk, stride_br,
                       SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_o = tl.program_id(2)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    if slot == 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_o = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < S
    r_mask = offs_r < R
    o_mask = offs_o < OUT
    # Prologue independent of the shrink's output (overlaps it under PDL):
    # B tile and the base output tile (written before the shrink started).
    b = tl.load(bt_ptr + slot * stride_bk + offs_r[:, None] * stride_br + offs_o[None, :],
                mask=r_mask[:, None] & o_mask[None, :], other=0.0)
    o = out_ptr + n * stride_on + offs_m.to(tl.int64)[:, None] * stride_os + offs_o[None, :]
    om = m_mask[:, None] & o_mask[None, :]
    cur = tl.load(o, mask=om, other=0.0)
    if USE_PDL:
        gdc_wait()
    t = n * S + offs_m
    p = p_ptr + t[:, None] * stride_pt + offs_r[None, :]
    pm = m_mask[:, None] & r_mask[None, :]
    xa = tl.load(p, mask=pm, other=0.0).to(tl.float32)
    for s in tl.static_range(1, SPLIT):
        xa += tl.load(p + s * stride_ps, mask=pm, other=0.0).to(tl.float32)
    if BLOCK_M == 1:
        acc = tl.sum(tl.trans(xa) * b.to(tl.float32), axis=0)[None, :]
    else:
        acc = _dot(xa.to(b.dtype), b, IEEE)
    tl.store(o, (cur.to(tl.float32) + acc).to(cur.dtype), mask=om)


@triton.jit
def expand_grouped_kernel(out_ptr, p_ptr, bt_ptr, slots_ptr,
                          N, OUT, R,
                          stride_on, stride_ps, stride_pt, stride_bk, stride_br,
                          SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                          BLOCK_R: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_n, slot, same, first = _slot_group(slots_ptr, N, pid, BLOCK_N)
    if slot == 0:
        return
    if first != pid:
        return
    offs_r = tl.arange(0, BLOCK_R)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    r_mask = offs_r < R
    o_mask = offs_o < OUT
    b = tl.load(bt_ptr + slot * stride_bk + offs_r[:, None] * stride_br + offs_o[None, :],
                mask=r_mask[:, None] & o_mask[None, :], other=0.0)
    o = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + offs_o[None, :]
    om = same[:, None] & o_mask[None, :]
    cur = tl.load(o, mask=om, other=0.0)
    if USE_PDL:
        gdc_wait()
    p = p_ptr + offs_n[:, None] * stride_pt + offs_r[None, :]
    pm = same[:, None] & r_mask[None, :]
    xa = tl.load(p, mask=pm, other=0.0).to(tl.float32)
    for s in tl.static_range(1, SPLIT):
        xa += tl.load(p + s * stride_ps, mask=pm, other=0.0).to(tl.float32)
    acc = _dot(xa.to(b.dtype), b, IEEE)
    tl.store(o, (cur.to(tl.float32) + acc).to(cur.dtype), mask=om)


@triton.jit
def group_shrink_kernel(x_ptr, pool_ptr, scales_ptr, slots_ptr, p_ptr,
                        N, IN, R, P, K_SLOTS, K_PER_SPLIT,
                        stride_xn, stride_pm, stride_ps, stride_pt,
                        A0, S0, A1, S1, A2, S2,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                        IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    """Decode shrink for up to three linears that read the same ``x`` (q/k/v, gate/up, or
    one alone), one launch: grid ``(row, k-split, member)``, grouped by slot like
    `shrink_grouped_kernel`. Member m's A block starts ``Am`` elements into a pool row
    of ``P`` elements, its scalings are row ``Sm`` of ``scales [L, K]``. Partials go
    to ``p[m, split, row, r]``; rows of slot 0 are left unwritten (the expand never
    reads them)."""
    if USE_PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n, slot, same, first = _slot_group(slots_ptr, N, pid, BLOCK_N)
    if slot == 0:
        return
    if first != pid:
        return
    a_off = tl.where(m == 2, A2, tl.where(m == 1, A1, A0)).to(tl.int64)
    s_row = tl.where(m == 2, S2, tl.where(m == 1, S1, S0))
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < R
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, IN)
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn
    a_rows = pool_ptr + slot * P + a_off + offs_r[:, None] * IN
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_end
        a = tl.load(a_rows + k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        xt = tl.load(x_rows + k[None, :], mask=same[:, None] & k_mask[None, :], other=0.0)
        acc += _dot(xt, tl.trans(a), IEEE)
    acc = acc * tl.load(scales_ptr + s_row * K_SLOTS + slot).to(tl.float32)
    p = p_ptr + m * stride_pm + pid_k * stride_ps + offs_n[:, None] * stride_pt + offs_r[None, :]
    tl.store(p, acc, mask=same[:, None])


@triton.jit
def group_expand_kernel(delta_ptr, p_ptr, pool_ptr, slots_ptr,
                        N, R, P, stride_pm, stride_ps, stride_pt,
                        B0, O0, D0, T0, B1, O1, D1, T1, B2, O2, D2,
                        SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                        BLOCK_R: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    """Expand of `group_shrink_kernel`'s partials into each member's delta, one launch:
    grid ``(row, tile)`` with tiles running over every member's outputs in turn (member m:
    ``Tm`` tiles, B^T block at ``Bm``, ``Om`` outputs, delta at element ``Dm`` of the
    buffer). Writes ``delta_m[n] = xa_m[n] @ B_m[slot]^T`` (zeros for slot-0 rows), which
    the member's base GEMM then accumulates into (beta = 1)."""
    pid = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    all_slots = tl.load(slots_ptr + offs_n, mask=offs_n < N, other=-1).to(tl.int64)
    slot = tl.sum(tl.where(offs_n == pid, all_slots, 0), axis=0)
    same = all_slots == slot
    first = tl.min(tl.where(same, offs_n, BLOCK_N), axis=0)
    if first != pid:
        return
    in1 = pid_t >= T0
    in2 = pid_t >= T0 + T1
    m = tl.where(in2, 2, tl.where(in1, 1, 0))
    b_off = tl.where(in2, B2, tl.where(in1, B1, B0)).to(tl.int64)
    out_m = tl.where(in2, O2, tl.where(in1, O1, O0))
    d_off = tl.where(in2, D2, tl.where(in1, D1, D0)).to(tl.int64)
    tile = pid_t - tl.where(in2, T0 + T1, tl.where(in1, T0, 0))
    offs_o = tile * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < out_m
    d_ptrs = delta_ptr + d_off + offs_n.to(tl.int64)[:, None] * out_m + offs_o[None, :]
    d_mask = same[:, None] & o_mask[None, :]
    if slot == 0:
        tl.store(d_ptrs, tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32).to(delta_ptr.dtype.element_ty), mask=d_mask)
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    b = tl.load(pool_ptr + slot * P + b_off + offs_r[:, None] * out_m + offs_o[None, :],
                mask=r_mask[:, None] & o_mask[None, :], other=0.0)
    if USE_PDL:
        gdc_wait()
    p = p_ptr + m * stride_pm + offs_n[:, None] * stride_pt + offs_r[None, :]
    pm = same[:, None] & r_mask[None, :]
    xa = tl.load(p, mask=pm, other=0.0).to(tl.float32)
    for s in tl.static_range(1, SPLIT):
        xa += tl.load(p + s * stride_ps, mask=pm, other=0.0).to(tl.float32)
    res = _dot(xa.to(b.dtype), b, IEEE)
    tl.store(d_ptrs, res.to(delta_ptr.dtype.element_ty), mask=d_mask)


@triton.jit(do_not_specialize=PREFILL_UNSPECIALIZED + ["S0", "S1", "S2"])
def group_shrink_rows_kernel(x_ptr, pool_ptr, scales_ptr, slots_ptr, p_ptr,
                             S, IN, R, P, K_SLOTS, K_PER_SPLIT,
                             stride_xn, stride_xs, stride_pm, stride_ps, stride_pt,
                             A0, S0, A1, S1, A2, S2,
                             M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """Prefill shrink for up to three linears that read the same ``x [N, S, in]``, one launch:
    grid ``(row, token-tile, k-split)``. Each program loads its ``x`` tile once per k-step and
    multiplies it by every member's A (accumulators ``acc0..acc2``), so ``x`` is read from memory
    once for the whole group, and the row's A blocks come straight from the pool (no gather).
    Partials go to ``p[m, split, token, r]``; tokens of slot-0 rows are left unwritten."""
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    if slot == 0:
        return
    offs_m, offs_r, offs_k, m_mask, r_mask, k_start, k_end, x_rows, p_tile = _rows_shrink_tile(
        x_ptr, n, S, IN, R, K_PER_SPLIT, stride_xn, stride_xs, stride_ps, stride_pt, BLOCK_M, BLOCK_K, BLOCK_R)
    row = pool_ptr + slot * P + offs_r[:, None] * IN
    acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_end
        am = r_mask[:, None] & k_mask[None, :]
        xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc0 += _dot(xt, tl.trans(tl.load(row + A0 + k[None, :], mask=am, other=0.0)), IEEE)
        if M > 1:
            acc1 += _dot(xt, tl.trans(tl.load(row + A1 + k[None, :], mask=am, other=0.0)), IEEE)
        if M > 2:
            acc2 += _dot(xt, tl.trans(tl.load(row + A2 + k[None, :], mask=am, other=0.0)), IEEE)
    p = p_ptr + p_tile
    tl.store(p, acc0 * tl.load(scales_ptr + S0 * K_SLOTS + slot).to(tl.float32), mask=m_mask[:, None])
    if M > 1:
        tl.store(p + stride_pm, acc1 * tl.load(scales_ptr + S1 * K_SLOTS + slot).to(tl.float32),
                 mask=m_mask[:, None])
    if M > 2:
        tl.store(p + 2 * stride_pm, acc2 * tl.load(scales_ptr + S2 * K_SLOTS + slot).to(tl.float32),
                 mask=m_mask[:, None])


@triton.jit(do_not_specialize=PREFILL_UNSPECIALIZED)
def group_expand_rows_kernel(delta_ptr, p_ptr, pool_ptr, slots_ptr,
                             S, R, P, stride_pm, stride_ps, stride_pt,
                             B0, O0, D0, T0, B1, O1, D1, T1, B2, O2, D2,
                             SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
                             BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """Expand of `group_shrink_rows_kernel`'s partials, one launch: grid ``(row, token-tile,
    tile)`` with tiles running over every member's outputs in turn (as `group_expand_kernel`).
    Writes ``delta_m[t] = xa_m[t] @ B_m[slot]^T`` (zeros for slot-0 rows) into a fresh buffer
    that the member's base GEMM accumulates into (beta = 1): the delta is written once and
    never read back by a separate add."""
    n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_t = tl.program_id(2)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    in1 = pid_t >= T0
    in2 = pid_t >= T0 + T1
    m = tl.where(in2, 2, tl.where(in1, 1, 0))
    b_off = tl.where(in2, B2, tl.where(in1, B1, B0)).to(tl.int64)
    out_m = tl.where(in2, O2, tl.where(in1, O1, O0))
    d_off = tl.where(in2, D2, tl.where(in1, D1, D0)).to(tl.int64)
    tile = pid_t - tl.where(in2, T0 + T1, tl.where(in1, T0, 0))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tile * BLOCK_O + tl.arange(0, BLOCK_O)
    m_mask = offs_m < S
    o_mask = offs_o < out_m
    t = n * S + offs_m
    d_ptrs = delta_ptr + d_off + t.to(tl.int64)[:, None] * out_m + offs_o[None, :]
    d_mask = m_mask[:, None] & o_mask[None, :]
    if slot == 0:
        tl.store(d_ptrs, tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32).to(delta_ptr.dtype.element_ty), mask=d_mask)
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    b = tl.load(pool_ptr + slot * P + b_off + offs_r[:, None] * out_m + offs_o[None, :],
                mask=r_mask[:, None] & o_mask[None, :], other=0.0)
    p = p_ptr + m * stride_pm + t[:, None] * stride_pt + offs_r[None, :]
    pm = m_mask[:, None] & r_mask[None, :]
    xa = tl.load(p, mask=pm, other=0.0).to(tl.float32)
    for s in tl.static_range(1, SPLIT):
        xa += tl.load(p + s * stride_ps, mask=pm, other=0.0).to(tl.float32)
    res = _dot(xa.to(b.dtype), b, IEEE)
    tl.store(d_ptrs, res.to(delta_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def decode_linear_lora_kernel(x_ptr, w_ptr, xa_ptr, pool_ptr, slots_ptr, y_ptr,
                              M, K, N, R, P, B_OFF, stride_xm, stride_wn, stride_xam, stride_xas, stride_ym,
                              SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, LORA: tl.constexpr,
                              IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    """One decode step's linear with its LoRA expand fused in: ``y = x @ W.T + xa @ B[slot].T``
    for ``M <= BLOCK_M`` rows (one token each). Grid ``(out tiles,)``: each program streams its
    ``[BLOCK_N, K]`` slice of W once (about as fast as cuBLAS for these skinny shapes,
    bench/RESULTS.md) and, in the epilogue, adds every row's delta from the
    shrink's scaled partials ``xa [SPLIT, M, >= R]`` (fp32) and the row's B^T block (pool row
    ``slot``, at element ``B_OFF``, ``[R, N]``). Slot 0's block is zeros and its partials are
    never read, so base rows need no branch. With ``USE_PDL`` (launched as a programmatic
    dependent of the shrink) the W stream runs while the shrink does; only the epilogue waits
    for it. Replaces a decode group member's base GEMM and its share of the expand launch."""
    if USE_PDL:
        gdc_launch_dependents()  # the next member may start streaming its W too
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += _dot(xt, tl.trans(wt), IEEE)
    if LORA:
        slots = tl.load(slots_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        live = m_mask & (slots != 0)  # the shrink leaves slot-0 rows unwritten
        if USE_PDL:
            gdc_wait()  # the shrink's partials are complete and visible from here on
        if BLOCK_M <= 32:  # the measured shape: [rows, 16 ranks, BLOCK_N] tiles
            for r0 in tl.static_range(0, BLOCK_R, 16):
                offs_r = r0 + tl.arange(0, 16)
                r_mask = offs_r < R
                xm = live[:, None] & r_mask[None, :]
                xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :], mask=xm, other=0.0)
                for s in tl.static_range(1, SPLIT):
                    xa += tl.load(xa_ptr + s * stride_xas + offs_m[:, None] * stride_xam + offs_r[None, :],
                                  mask=xm, other=0.0)
                b = tl.load(pool_ptr + slots[:, None, None] * P + B_OFF + offs_r[None, :, None] * N
                            + offs_n[None, None, :],
                            mask=live[:, None, None] & r_mask[None, :, None] & n_mask[None, None, :], other=0.0)
                acc += tl.sum(xa[:, :, None] * b.to(tl.float32), axis=1)
        else:  # 64-128 rows: one rank at a time, so the tile stays [rows, BLOCK_N] (registers)
            for r in range(0, R):
                xa_r = tl.load(xa_ptr + offs_m * stride_xam + r, mask=live, other=0.0)
                for s in tl.static_range(1, SPLIT):
                    xa_r += tl.load(xa_ptr + s * stride_xas + offs_m * stride_xam + r, mask=live, other=0.0)
                b_r = tl.load(pool_ptr + slots[:, None] * P + B_OFF + r * N + offs_n[None, :],
                              mask=live[:, None] & n_mask[None, :], other=0.0)
                acc += xa_r[:, None] * b_r.to(tl.float32)
    elif USE_PDL:
        gdc_wait()
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=PREFILL_UNSPECIALIZED)
def gated_act_lora_kernel(g_ptr, u_ptr, h_ptr, p_ptr, pool_ptr, slots_ptr,
                          S, I, R, P, BG, BU, stride_pm, stride_ps, stride_pt,
                          SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
                          BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """A gated MLP's activation with both LoRA expands fused in (prefill):
    ``h = silu(g + xa_g @ Bg[slot]) * (u + xa_u @ Bu[slot])`` where ``g``/``u`` are the base
    gate/up outputs ``[N*S, I]`` and ``xa_*`` `group_shrink_rows_kernel`'s partials (members 0 and
    1, scaling applied). Grid ``(row, token-tile, out-tile)``.

    Why: added to g and u separately, the deltas cost a full-width write and read-back each
    (the largest tensors of a Llama layer); here they live only in registers, and the
    activation's read of g and u is the one the model's ``act(g) * u`` needed anyway.
    Slot-0 rows skip the expand (the shrink left their partials unwritten)."""
    n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_o = tl.program_id(2)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_mask = offs_m < S
    o_mask = offs_o < I
    t = n * S + offs_m
    idx = t[:, None] * I + offs_o[None, :]
    mask = m_mask[:, None] & o_mask[None, :]
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if slot != 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        bmask = r_mask[:, None] & o_mask[None, :]
        b_row = pool_ptr + slot * P + offs_r[:, None] * I + offs_o[None, :]
        bg = tl.load(b_row + BG, mask=bmask, other=0.0)
        bu = tl.load(b_row + BU, mask=bmask, other=0.0)
        p = p_ptr + t[:, None] * stride_pt + offs_r[None, :]
        pm = m_mask[:, None] & r_mask[None, :]
        xg = tl.load(p, mask=pm, other=0.0)
        xu = tl.load(p + stride_pm, mask=pm, other=0.0)
        for s in tl.static_range(1, SPLIT):
            xg += tl.load(p + s * stride_ps, mask=pm, other=0.0)
            xu += tl.load(p + stride_pm + s * stride_ps, mask=pm, other=0.0)
        g += _dot(xg.to(bg.dtype), bg, IEEE)
        u += _dot(xu.to(bu.dtype), bu, IEEE)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + idx, h.to(h_ptr.dtype.element_ty), mask=mask)
