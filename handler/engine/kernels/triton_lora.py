"""Triton backend for the mixed-adapter LoRA delta (Punica SGMV/BGMV style).

Drop-in for ``lora_ops.prepare_mixed`` + ``lora_ops.add_mixed_`` (same pool layout, same
math; see ``handler/engine/lora_ops.py``)::

    add_mixed_triton_(out, x, slots, A, Bt, scaling, rank)
    # out[n, s] += scaling[slots[n]] * (x[n, s] @ A[slots[n], :rank].T) @ Bt[slots[n], :rank]

Two launches per call (shrink, expand), no host sync, no value-dependent
Python branch, one fixed-size fp32 temporary (``[SPLIT, N*S, BLOCK_R]``, from
the caching allocator): safe inside CUDA-graph capture, and registered as the
custom op ``torch.ops.loraplex.add_mixed_lora_`` with a fake implementation so
``torch.compile(fullgraph=True)`` traces through it. Changing ``slots`` (in
place) between graph replays gives the new adapters' results.

Importing this module never needs triton or CUDA; :func:`available` says
whether the kernels can run (CUDA + triton, or triton's CPU interpreter with
``TRITON_INTERPRET=1`` set before triton is first imported). Without them the
custom op's CPU implementation falls back to the plain-torch ``handler.engine.lora_ops`` path.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["available", "add_mixed_triton_", "lora_shrink", "lora_expand_add_", "KernelConfig", "choose_config",
           "GroupMember", "group_deltas_triton", "group_decode_linears", "group_gated_act"]

MAX_RANK = 64  # BLOCK_R up to 64: the register tiles are sized for it
GROUPED_MAX_ROWS = 128  # decode rows handled by one grouped program (masked [BLOCK_N, ...] tiles)
GROUP_MAX_MEMBERS = 3


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


# Triton's own switch for its CPU interpreter, read once at import (triton reads it the same way).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """True when the Triton kernels can run here: triton imports and there is a
    CUDA device (or triton's CPU interpreter is switched on)."""
    if not _triton_importable():
        return False
    return torch.cuda.is_available() or INTERPRET


@functools.lru_cache(maxsize=None)
def _k():
    from . import _triton_kernels

    return _triton_kernels


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _pdl_supported(device_index: int) -> bool:
    """PDL: Hopper or newer and a triton that has gdc_* and the launch_pdl option (the engine can
    switch it off: `EngineSettings.triton_pdl`, passed to the launchers as ``pdl``)."""
    if INTERPRET:
        return False
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        if "launch_pdl" not in CUDAOptions.__dataclass_fields__:
            return False
    except Exception:
        return False
    return bool(_k().HAS_GDC)


def _use_pdl(device: torch.device, allowed: bool = True) -> bool:
    """Whether launches on `device` use PDL: `allowed` (the caller's setting) and supported there."""
    if not allowed or device.type != "cuda":
        return False
    return _pdl_supported(device.index if device.index is not None else torch.cuda.current_device())


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------
# launch configuration (a function of shapes only: graph-safe, cache-friendly)
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    grouped: bool  # decode: one program per distinct slot (first row that uses it)
    block_m: int  # tokens per program (row layout); 1 = vector x matrix (BGMV)
    block_k: int  # shrink: `in` chunk per loop step
    split: int  # shrink: partial sums over `in` (k-split), summed by the expand
    k_per_split: int
    block_o: int  # expand: output columns per program
    block_r: int  # padded rank (power of two, >= 16)
    block_n: int  # grouped: rows per program (power of two >= N, >= 16)
    num_warps_shrink: int = 4
    num_warps_expand: int = 4
    num_stages: int = 3
    pdl: bool = False  # programmatic dependent launch of the expand (Hopper+)


def choose_config(n_rows: int, seq: int, d_in: int, d_out: int, rank: int, dtype: torch.dtype,
                  num_sms: int = 132, pdl: bool = False, **override) -> KernelConfig:
    """Heuristic launch shape from the static shapes. ``override`` replaces fields
    (used by the bench to try variants)."""
    block_r = max(16, _pow2(rank))
    fp32 = dtype == torch.float32
    if seq == 1:
        grouped = n_rows <= GROUPED_MAX_ROWS
        block_n = max(16, _pow2(n_rows))
        block_m = 16 if grouped else 1
        block_k = (64 if fp32 else 128) if grouped else 256
        # Enough programs to spread `x` and A over the SMs even when one adapter
        # serves the whole batch, but few partials for the expand to sum.
        split = max(1, min(8, _cdiv(d_in, 512)))
        # Wider tiles halve the programs when every row has its own adapter
        # (bench/RESULTS.md).
        block_o = 256 if d_out >= 4096 else 128
    else:
        grouped = False
        block_n = 16
        block_m = 16 if seq <= 16 else (32 if seq <= 32 else 64)
        block_k = 32 if fp32 else 64
        progs = n_rows * _cdiv(seq, block_m)
        split = max(1, min(_cdiv(2 * num_sms, progs), d_in // 1024, 8))
        block_o = 64 if fp32 else 128
    k_per_split = _cdiv(_cdiv(d_in, split), block_k) * block_k
    split = _cdiv(d_in, k_per_split)
    cfg = KernelConfig(grouped=grouped, block_m=block_m, block_k=block_k, split=split, k_per_split=k_per_split,
                       block_o=block_o, block_r=block_r, block_n=block_n, pdl=pdl)
    if override:
        fields = dict(cfg.__dict__)
        fields.update(override)
        if "split" in override and "k_per_split" not in override:
            kps = _cdiv(_cdiv(d_in, fields["split"]), fields["block_k"]) * fields["block_k"]
            fields["k_per_split"], fields["split"] = kps, _cdiv(d_in, kps)
        if fields["grouped"] and fields["block_m"] == 1:
            fields["block_m"] = 16
        cfg = KernelConfig(**fields)
    return cfg


# ----------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------
def _check_pool(A: torch.Tensor, Bt: torch.Tensor | None, scaling: torch.Tensor | None, slots: torch.Tensor,
                device: torch.device) -> None:
    assert A.dim() == 3 and A.stride(2) == 1, f"A must be [K, r, in] with a contiguous last dim, got {tuple(A.shape)}"
    if Bt is not None:
        assert Bt.dim() == 3 and Bt.stride(2) == 1, "Bt must be [K, r, out] with a contiguous last dim"
        assert Bt.shape[0] == A.shape[0] and Bt.shape[1] == A.shape[1], "A and Bt pools disagree on K or r_max"
    if scaling is not None:
        assert scaling.dim() == 1 and scaling.shape[0] == A.shape[0], "scaling must be [K]"
    assert slots.dim() == 1 and slots.dtype in (torch.int64, torch.int32), "slots must be [N] int64/int32"
    assert slots.is_contiguous(), "slots must be contiguous"
    for t in (A, Bt, scaling, slots):
        if t is not None:
            assert t.device == device, f"all tensors must be on {device}, got {t.device}"


def _run_shrink(x3: torch.Tensor, A: torch.Tensor, slots: torch.Tensor, scaling: torch.Tensor, rank: int,
                cfg: KernelConfig, partials: torch.Tensor) -> None:
    k = _k()
    N, S, d_in = x3.shape
    ieee = x3.dtype == torch.float32
    if cfg.grouped:
        assert S == 1 and N <= cfg.block_n
        k.shrink_grouped_kernel[(N, cfg.split)](
            x3, A, slots, scaling, partials, N, d_in, rank, cfg.k_per_split,
            x3.stride(0), A.stride(0), A.stride(1), partials.stride(0), partials.stride(1),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r, IEEE=ieee, USE_PDL=cfg.pdl,
            num_warps=cfg.num_warps_shrink, num_stages=cfg.num_stages)
    else:
        k.shrink_rows_kernel[(N, _cdiv(S, cfg.block_m), cfg.split)](
            x3, A, slots, scaling, partials, S, d_in, rank, cfg.k_per_split,
            x3.stride(0), x3.stride(1), A.stride(0), A.stride(1), partials.stride(0), partials.stride(1),
            BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r, IEEE=ieee, USE_PDL=cfg.pdl,
            num_warps=cfg.num_warps_shrink, num_stages=cfg.num_stages)


def _run_expand(out3: torch.Tensor, partials: torch.Tensor, split: int, Bt: torch.Tensor, slots: torch.Tensor,
                rank: int, cfg: KernelConfig) -> None:
    k = _k()
    N, S, d_out = out3.shape
    ieee = Bt.dtype == torch.float32
    extra = {"launch_pdl": True} if cfg.pdl else {}
    if cfg.grouped:
        assert S == 1 and N <= cfg.block_n
        k.expand_grouped_kernel[(N, _cdiv(d_out, cfg.block_o))](
            out3, partials, Bt, slots, N, d_out, rank,
            out3.stride(0), partials.stride(0), partials.stride(1), Bt.stride(0), Bt.stride(1),
            SPLIT=split, BLOCK_N=cfg.block_n, BLOCK_O=cfg.block_o, BLOCK_R=cfg.block_r, IEEE=ieee,
            USE_PDL=cfg.pdl, num_warps=cfg.num_warps_expand, **extra)
    else:
        k.expand_rows_kernel[(N, _cdiv(S, cfg.block_m), _cdiv(d_out, cfg.block_o))](
            out3, partials, Bt, slots, S, d_out, rank,
            out3.stride(0), out3.stride(1), partials.stride(0), partials.stride(1), Bt.stride(0), Bt.stride(1),
            SPLIT=split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_o, BLOCK_R=cfg.block_r, IEEE=ieee,
            USE_PDL=cfg.pdl, num_warps=cfg.num_warps_expand, **extra)


def _add_mixed_impl(out: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
                    scaling: torch.Tensor, rank: int, cfg: KernelConfig | None = None, pdl: bool = True) -> None:
    N, S, d_in = x.shape
    d_out = out.shape[-1]
    if N == 0 or S == 0 or rank == 0:
        return
    if cfg is None:
        # PDL pays in decode (hides the expand's launch and prologue);
        # in prefill the waiting expand programs cost the shrink SM slots.
        cfg = choose_config(N, S, d_in, d_out, rank, x.dtype, _sms(x.device), pdl=S == 1 and _use_pdl(x.device, pdl))
    # Rows of slot-0 tokens are never written nor read: empty is enough.
    partials = torch.empty((cfg.split, N * S, cfg.block_r), dtype=torch.float32, device=x.device)
    _run_shrink(x, A, slots, scaling, rank, cfg, partials)
    _run_expand(out, partials, cfg.split, Bt, slots, rank, cfg)


def _check_mixed(out, x, slots, A, Bt, scaling, rank) -> None:
    assert x.dim() == 3 and out.dim() == 3, "x and out must be [N, S, in] / [N, S, out]"
    N, S, d_in = x.shape
    assert out.shape[:2] == (N, S), f"out {tuple(out.shape)} does not match x {tuple(x.shape)}"
    assert x.stride(2) == 1 and out.stride(2) == 1, "x and out need a contiguous last dim"
    assert slots.shape == (N,), f"slots must be [{N}], got {tuple(slots.shape)}"
    _check_pool(A, Bt, scaling, slots, x.device)
    assert out.device == x.device
    assert A.shape[2] == d_in and Bt.shape[2] == out.shape[2], "pool in/out do not match x/out"
    assert x.dtype == A.dtype == Bt.dtype, f"x/A/Bt dtypes differ: {x.dtype}, {A.dtype}, {Bt.dtype}"
    assert out.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert 0 <= rank <= A.shape[1] and rank <= MAX_RANK, f"rank {rank} must be in [0, min(r_max={A.shape[1]}, 64)]"


# ----------------------------------------------------------------------------
# custom op (torch.compile / CUDA graphs)
# ----------------------------------------------------------------------------
@torch.library.custom_op("loraplex::add_mixed_lora_", mutates_args=("out",))
def _add_mixed_op(out: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
                  scaling: torch.Tensor, rank: int, pdl: bool) -> None:
    if x.is_cuda or (INTERPRET and _triton_importable()):
        _add_mixed_impl(out, x, slots, A, Bt, scaling, rank, pdl=pdl)
        return
    # CPU without the interpreter: the plain-torch path (same math).
    from .. import lora_ops as ops

    if rank:
        ops.add_mixed_(out, x, ops.prepare_mixed(slots.long(), A, Bt.transpose(1, 2), scaling, rank=rank))


@_add_mixed_op.register_fake
def _(out, x, slots, A, Bt, scaling, rank, pdl) -> None:
    return None


# ----------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------
def add_mixed_triton_(out: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
                      scaling: torch.Tensor, rank: int, pdl: bool = True) -> torch.Tensor:
    """``out[n, s] += scaling[slots[n]] * (x[n, s] @ A[slots[n], :rank].T) @ Bt[slots[n], :rank]``, in place.

    Preconditions (asserted, shapes/dtypes only - nothing reads tensor values):
    ``x [N, S, in]`` and ``out [N, S, out]`` with contiguous last dims (other
    strides free); ``A [K, r_max, in]``, ``Bt [K, r_max, out]`` (contiguous last
    dims), ``scaling [K]``, ``slots [N]`` int64/int32 contiguous, all on one
    device; x, A, Bt one dtype (fp32/bf16/fp16), out fp32/bf16/fp16;
    ``0 <= rank <= min(r_max, 64)``; pool entries past a slot's true rank are
    zero (so ``rank`` = the largest rank among the batch's slots is exact);
    slot values in ``[0, K)`` (not checked: that would need a sync). Slot 0 rows
    are skipped on the device. ``pdl``: a decode call may use programmatic dependent
    launch where the GPU supports it. Returns ``out``.
    """
    _check_mixed(out, x, slots, A, Bt, scaling, rank)
    torch.ops.loraplex.add_mixed_lora_(out, x, slots, A, Bt, scaling, int(rank), bool(pdl))
    return out


def lora_shrink(x2d: torch.Tensor, A: torch.Tensor, slots_per_row: torch.Tensor, rows_len: int,
                scaling: torch.Tensor, rank: int, cfg: KernelConfig | None = None) -> torch.Tensor:
    """``xa[t] = scaling[slot(t)] * x2d[t] @ A[slot(t), :rank].T`` (fp32), ``[T, rank]``.

    Row n of the batch owns tokens ``n*S .. n*S+S-1`` (``S = rows_len``); its
    slot is ``slots_per_row[n]``. Tokens of slot-0 rows come back as zeros.
    """
    assert x2d.dim() == 2 and x2d.stride(1) == 1, "x2d must be [T, in] with a contiguous last dim"
    T, d_in = x2d.shape
    S = int(rows_len)
    N = slots_per_row.shape[0]
    assert S >= 1 and T == N * S, f"T={T} must equal N*S={N}*{S}"
    _check_pool(A, None, scaling, slots_per_row, x2d.device)
    assert A.shape[2] == d_in and x2d.dtype == A.dtype
    assert 1 <= rank <= min(A.shape[1], MAX_RANK)
    if cfg is None:
        cfg = choose_config(N, S, d_in, 1, rank, x2d.dtype, _sms(x2d.device))
    partials = torch.zeros((cfg.split, T, cfg.block_r), dtype=torch.float32, device=x2d.device)
    x3 = x2d.as_strided((N, S, d_in), (S * x2d.stride(0), x2d.stride(0), 1))
    _run_shrink(x3, A, slots_per_row, scaling, rank, cfg, partials)
    return partials.sum(0)[:, :rank]


def lora_expand_add_(out2d: torch.Tensor, xa: torch.Tensor, Bt: torch.Tensor, slots_per_row: torch.Tensor,
                     rows_len: int, cfg: KernelConfig | None = None) -> torch.Tensor:
    """``out2d[t] += xa[t] @ Bt[slot(t), :r]`` in place (``r = xa.shape[1]``; scale
    already folded into ``xa``). Slot-0 rows are left untouched. Returns ``out2d``."""
    assert out2d.dim() == 2 and out2d.stride(1) == 1, "out2d must be [T, out] with a contiguous last dim"
    assert xa.dim() == 2 and xa.stride(1) == 1 and xa.shape[0] == out2d.shape[0], "xa must be [T, r]"
    T, d_out = out2d.shape
    S = int(rows_len)
    N = slots_per_row.shape[0]
    r = xa.shape[1]
    assert S >= 1 and T == N * S, f"T={T} must equal N*S={N}*{S}"
    assert Bt.dim() == 3 and Bt.stride(2) == 1 and Bt.shape[2] == d_out and 1 <= r <= min(Bt.shape[1], MAX_RANK)
    assert slots_per_row.dim() == 1 and slots_per_row.is_contiguous() and Bt.device == out2d.device == xa.device
    assert out2d.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if cfg is None:
        cfg = choose_config(N, S, 1, d_out, r, Bt.dtype, _sms(out2d.device))
    partials = xa.unsqueeze(0)  # [1, T, r]: SPLIT = 1
    out3 = out2d.as_strided((N, S, d_out), (S * out2d.stride(0), out2d.stride(0), 1))
    _run_expand(out3, partials, 1, Bt, slots_per_row, r, cfg)
    return out2d


# ----------------------------------------------------------------------------
# decode deltas of linears sharing one input, one launch (CUDA graphs)
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupMember:
    """Where one linear's adapter lives in the slot-major pool row (element offsets) and
    which row of ``scales [L, K]`` holds its scalings."""

    a_off: int
    b_off: int
    out: int
    scale_row: int


def group_deltas_triton(x: torch.Tensor, pool: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor,
                        members: "list[GroupMember] | tuple[GroupMember, ...]", d_in: int,
                        rank: int, pdl: bool = True) -> list[torch.Tensor]:
    """``delta_m[n] = scaling_m[slots[n]] * (x[n] @ A_m[slot].T) @ B_m[slot].T`` for each member m,
    as contiguous slices of one fresh buffer; rows of slot 0 get zeros. Two launches for the
    whole group (a shrink over every member, then one expand writing every member's delta),
    no host sync: graph-safe.

    ``x [N, in]`` (one token per row, a decode step): deltas ``[N, out_m]``, grouped by slot
    (each distinct adapter read once, `group_shrink_kernel`), ``N <= 128``.
    ``x [N, S, in]`` (prefill): deltas ``[N, S, out_m]``, one program per row and token tile
    reading ``x`` once for all members (`group_shrink_rows_kernel`).

    The caller adds each delta through the base GEMM (``delta.addmm_(x, W.T)``), so the
    LoRA of a whole q/k/v or gate/up group costs two kernels instead of two per linear, and
    nothing gathers adapters per row. Preconditions (asserted): 1-3 members, ``rank <= 64``,
    x and pool one dtype, ``x`` with a contiguous last dim, pool ``[K, P]`` contiguous;
    offsets are the caller's (`multilora.groups`) and are not range-checked here.
    """
    assert x.dim() in (2, 3) and x.stride(-1) == 1 and x.shape[-1] == d_in, \
        "x must be [N, in] or [N, S, in] with a contiguous last dim"
    assert pool.dim() == 2 and pool.is_contiguous() and scales.dim() == 2 and scales.is_contiguous()
    assert 1 <= len(members) <= GROUP_MAX_MEMBERS, f"1-{GROUP_MAX_MEMBERS} members"
    N = x.shape[0]
    assert N >= 1 and slots.shape == (N,) and slots.is_contiguous()
    assert 0 < rank <= MAX_RANK and x.dtype == pool.dtype and x.device == pool.device == slots.device
    if x.dim() == 3:
        return _group_deltas_rows(x, pool, scales, slots, members, d_in, rank)
    assert N <= GROUPED_MAX_ROWS, f"a decode group serves at most {GROUPED_MAX_ROWS} rows"
    outs = [m.out for m in members]
    buf = torch.empty(N * sum(outs), dtype=x.dtype, device=x.device)
    ieee = x.dtype == torch.float32
    block_o = 256 if max(outs) >= 4096 else 128  # as `choose_config`: fewer programs for wide outputs
    pdl = _use_pdl(x.device, pdl)
    partials, split, block_n, block_r = _decode_group_shrink(x, pool, scales, slots, members, d_in, rank, pdl)
    tiles = [_cdiv(o, block_o) for o in outs]
    extra = {"launch_pdl": True} if pdl else {}
    _k().group_expand_kernel[(N, sum(tiles))](
        buf, partials, pool, slots, N, rank, pool.stride(0), partials.stride(0), partials.stride(1),
        partials.stride(2), *_b_args(members, tiles, N), SPLIT=split, BLOCK_N=block_n, BLOCK_O=block_o,
        BLOCK_R=block_r, IEEE=ieee, USE_PDL=pdl, num_warps=4, **extra)
    return _split_buffer(buf, (N,), outs)


def group_decode_linears(x: torch.Tensor, pool: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor,
                         members: "list[GroupMember] | tuple[GroupMember, ...]", weights: "list[torch.Tensor]",
                         d_in: int, rank: int, pdl: bool = True) -> list[torch.Tensor]:
    """A decode step's whole group: ``y_m = x @ W_m.T + scaling_m[slot] * (x @ A_m[slot].T) @ B_m[slot].T``
    for each member m (``x [N, in]``, one token per row), as ``[N, out_m]`` tensors.

    One grouped shrink, then one kernel per member that streams ``W_m`` and adds the expand
    in its epilogue (`decode_linear_lora_kernel`): the group costs one launch more than the
    base model's GEMMs, and on Hopper (PDL) the members' weight streams start while the shrink
    runs. Graph-safe (no host sync). Preconditions as `group_deltas_triton`'s decode layout,
    plus ``weights[m]`` ``[out_m, in]`` with a contiguous last dim, in x's dtype.
    """
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] == d_in, "x must be [N, in] with a contiguous last dim"
    assert pool.dim() == 2 and pool.is_contiguous() and scales.dim() == 2 and scales.is_contiguous()
    assert 1 <= len(members) <= GROUP_MAX_MEMBERS and len(weights) == len(members)
    N = x.shape[0]
    assert 1 <= N <= GROUPED_MAX_ROWS and slots.shape == (N,) and slots.is_contiguous()
    assert 0 < rank <= MAX_RANK and x.dtype == pool.dtype and x.device == pool.device == slots.device
    for m, w in zip(members, weights):
        assert w.shape == (m.out, d_in) and w.stride(1) == 1 and w.dtype == x.dtype, "weight must be [out, in]"
    ieee = x.dtype == torch.float32
    pdl = _use_pdl(x.device, pdl)
    partials, split, block_n, block_r = _decode_group_shrink(x, pool, scales, slots, members, d_in, rank, pdl)
    outs = []
    extra = {"launch_pdl": True} if pdl else {}
    for i, (m, w) in enumerate(zip(members, weights)):
        y = torch.empty((N, m.out), dtype=x.dtype, device=x.device)
        bn, bk, stages = _decode_linear_shape(N, d_in, m.out, ieee)
        _k().decode_linear_lora_kernel[(_cdiv(m.out, bn),)](
            x, w, partials[i], pool, slots, y, N, d_in, m.out, rank, pool.stride(0), m.b_off, x.stride(0),
            w.stride(0), partials.stride(2), partials.stride(1), y.stride(0), SPLIT=split, BLOCK_M=block_n,
            BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, LORA=True, IEEE=ieee, USE_PDL=pdl, num_warps=4,
            num_stages=stages, **extra)
        outs.append(y)
    return outs


def _decode_group_shrink(x: torch.Tensor, pool: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor,
                         members, d_in: int, rank: int, pdl: bool) -> tuple[torch.Tensor, int, int, int]:
    """Launch a decode group's shrink (`group_shrink_kernel`, grouped by slot, k-split):
    returns the fp32 partials ``[members, split, N, block_r]`` and ``split, block_n, block_r``."""
    N, M = x.shape[0], len(members)
    ieee = x.dtype == torch.float32
    block_k = 64 if ieee else 128
    split = max(1, min(8, _cdiv(d_in, 512)))  # as `choose_config` for a decode shrink
    k_per_split = _cdiv(_cdiv(d_in, split), block_k) * block_k
    split = _cdiv(d_in, k_per_split)
    block_n, block_r = max(16, _pow2(N)), max(16, _pow2(rank))
    partials = torch.empty((M, split, N, block_r), dtype=torch.float32, device=x.device)
    _k().group_shrink_kernel[(N, split, M)](
        x, pool, scales, slots, partials, N, d_in, rank, pool.stride(0), scales.shape[1], k_per_split,
        x.stride(0), partials.stride(0), partials.stride(1), partials.stride(2), *_a_args(members),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, IEEE=ieee, USE_PDL=pdl, num_warps=4, num_stages=3)
    return partials, split, block_n, block_r


def _decode_linear_shape(rows: int, d_in: int, d_out: int, fp32: bool) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, stages)`` for `decode_linear_lora_kernel`: the fastest measured for
    32 rows on Llama 1B/8B shapes (bench/RESULTS.md; time variants with `tuning.decode_linear_shape`);
    shorter k-steps where the row tile or fp32 would overflow shared memory."""
    if d_out >= 12288:
        bn, bk = 64, 128
    elif d_out >= 8192:
        bn, bk = 32, 128
    elif d_in * d_out >= 4096 * 4096:
        bn, bk = 32, 256
    else:
        bn, bk = 16, 256
    if fp32:
        bk = 64
    elif rows > 32:
        bk = min(bk, 128 if rows <= 64 else 64)
    return bn, bk, 4


def _group_deltas_rows(x: torch.Tensor, pool: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor,
                       members, d_in: int, rank: int, cfg: dict | None = None) -> list[torch.Tensor]:
    """The prefill layout of `group_deltas_triton` (``x [N, S, in]``). ``cfg`` overrides the
    launch shape (``block_m``, ``block_k``, ``block_o``, ``warps_shrink``, ``warps_expand``,
    ``stages``); only the kernel bench passes it."""
    N, S, _ = x.shape
    outs = [m.out for m in members]
    cfg = cfg or {}
    partials, split, block_m, block_r = _rows_shrink(x, pool, scales, slots, members, d_in, rank, cfg)
    # 256-wide expand tiles: the delta is all this launch pair writes, and wider tiles write it
    # faster (bench/RESULTS.md)
    block_o = cfg.get("block_o") or (64 if x.dtype == torch.float32 else 256)
    buf = torch.empty(N * S * sum(outs), dtype=x.dtype, device=x.device)
    tiles = [_cdiv(o, block_o) for o in outs]
    _k().group_expand_rows_kernel[(N, _cdiv(S, block_m), sum(tiles))](
        buf, partials, pool, slots, S, rank, pool.stride(0), partials.stride(0), partials.stride(1),
        partials.stride(2), *_b_args(members, tiles, N * S), SPLIT=split, BLOCK_M=block_m, BLOCK_O=block_o,
        BLOCK_R=block_r, IEEE=x.dtype == torch.float32, num_warps=cfg.get("warps_expand", 4))
    return _split_buffer(buf, (N, S), outs)


def _rows_shrink(x: torch.Tensor, pool: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, members,
                 d_in: int, rank: int, cfg: dict) -> tuple[torch.Tensor, int, int, int]:
    """Launch a prefill group's shrink (`group_shrink_rows_kernel`, ``x [N, S, in]`` read once for
    every member): returns the fp32 partials ``[members, split, N*S, block_r]`` (scaling applied)
    and ``split, block_m, block_r``."""
    N, S, _ = x.shape
    ieee = x.dtype == torch.float32
    block_m = cfg.get("block_m") or prefill_block_m(S)
    block_k = cfg.get("block_k") or (32 if ieee else 64)
    block_r = max(16, _pow2(rank))
    tiles_m = _cdiv(S, block_m)
    # k-split only when rows x token tiles cannot fill the GPU (short prompts, small batches);
    # two values per width, so `warm_prefill` can compile every variant the expand takes
    split = cfg.get("split") or (prefill_max_split(d_in) if N * tiles_m < _sms(x.device) else 1)
    k_per_split = _cdiv(_cdiv(d_in, split), block_k) * block_k
    split = _cdiv(d_in, k_per_split)
    partials = torch.empty((len(members), split, N * S, block_r), dtype=torch.float32, device=x.device)
    _k().group_shrink_rows_kernel[(N, tiles_m, split)](
        x, pool, scales, slots, partials, S, d_in, rank, pool.stride(0), scales.shape[1], k_per_split,
        x.stride(0), x.stride(1), partials.stride(0), partials.stride(1), partials.stride(2), *_a_args(members),
        M=len(members), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, IEEE=ieee,
        num_warps=cfg.get("warps_shrink", 4), num_stages=cfg.get("stages", 3))
    return partials, split, block_m, block_r


def group_gated_act(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, pool: torch.Tensor, scales: torch.Tensor,
                    slots: torch.Tensor, members: "list[GroupMember] | tuple[GroupMember, ...]", d_in: int,
                    rank: int, cfg: dict | None = None) -> torch.Tensor:
    """A gated-SiLU MLP's hidden state for a prefill with LoRA on gate and up:
    ``h = silu(gate + Δgate) * (up + Δup)`` where ``gate``/``up`` ``[N, S, I]`` are the *base*
    projections of ``x [N, S, in]`` and ``Δ`` each row's adapter (members ``(gate, up)``).

    Two launches: the group shrink (reads ``x`` once) and `gated_act_lora_kernel`, which adds
    both expands in registers while it applies the activation, so neither delta is ever
    written (with deltas added through the GEMMs they were the largest extra traffic of a
    prefill: H100 1B, bench/RESULTS.md). Preconditions (asserted): two members with one output
    width, ``rank <= 64``, ``gate``/``up`` contiguous in x's dtype. ``cfg`` overrides the launch
    shape (``block_o``, ``warps_act`` and `_rows_shrink`'s keys); only the kernel bench passes it.
    """
    assert x.dim() == 3 and x.stride(-1) == 1 and x.shape[-1] == d_in, "x must be [N, S, in] with a contiguous last dim"
    assert pool.dim() == 2 and pool.is_contiguous() and scales.dim() == 2 and scales.is_contiguous()
    assert len(members) == 2 and members[0].out == members[1].out, "members are (gate, up) of one width"
    N, S, _ = x.shape
    inter = members[0].out
    assert gate.shape == up.shape == (N, S, inter) and gate.is_contiguous() and up.is_contiguous()
    assert slots.shape == (N,) and slots.is_contiguous() and 0 < rank <= MAX_RANK
    assert x.dtype == pool.dtype == gate.dtype == up.dtype and x.device == pool.device == slots.device
    cfg = cfg or {}
    partials, split, block_m, block_r = _rows_shrink(x, pool, scales, slots, members, d_in, rank, cfg)
    ieee = x.dtype == torch.float32
    block_o = cfg.get("block_o") or (64 if ieee else 128)
    h = torch.empty_like(gate)
    _k().gated_act_lora_kernel[(N, _cdiv(S, block_m), _cdiv(inter, block_o))](
        gate, up, h, partials, pool, slots, S, inter, rank, pool.stride(0), members[0].b_off, members[1].b_off,
        partials.stride(0), partials.stride(1), partials.stride(2), SPLIT=split, BLOCK_M=block_m,
        BLOCK_O=block_o, BLOCK_R=block_r, IEEE=ieee, num_warps=cfg.get("warps_act", 4))
    return h


def compiled_variants() -> int:
    """How many kernel variants Triton has compiled in this process for the kernels here (every
    device); 0 without triton or under its interpreter. `describe` reports it, so a serving run
    can show that it compiled nothing after warmup."""
    if not available():
        return 0
    n = 0
    for obj in vars(_k()).values():
        caches = getattr(obj, "device_caches", None)
        if isinstance(caches, dict):
            n += sum(len(entry[0]) for entry in caches.values())
    return n


PREFILL_BLOCK_M = (16, 32, 64)  # the prefill kernels' token tiles, by chunk length (`prefill_block_m`)


def prefill_block_m(tokens: int) -> int:
    """The prefill kernels' token tile for a chunk of `tokens` tokens per row."""
    return next((b for b in PREFILL_BLOCK_M if tokens <= b), PREFILL_BLOCK_M[-1])


def prefill_max_split(d_in: int) -> int:
    """The prefill shrink's k-split when rows x token tiles cannot fill the GPU."""
    return max(1, min(8, d_in // 1024))


def warm_prefill(pool: torch.Tensor, scales: torch.Tensor, members: "list[GroupMember] | tuple[GroupMember, ...]",
                 d_in: int, max_rank: int, gated: bool = False) -> int:
    """Compile every variant the prefill group kernels (`group_deltas_triton`'s row layout and,
    with `gated`, `group_gated_act`) can launch for this group, so that no request waits for
    Triton's JIT (a compile per variant, on the thread that owns the engine).

    The variants are the constexpr launch shapes: token tile (`PREFILL_BLOCK_M`) x k-split
    (1 or `prefill_max_split`) x rank tile (16, 32, ... up to `max_rank`); the chunk length and
    the rank are not specialised on (`_triton_kernels.PREFILL_UNSPECIALIZED`), and the kernels'
    other integer arguments are multiples of 16 at every shape, so a one-row launch of each
    shape compiles exactly what a serving prefill of that shape uses. Every row is slot 0, so
    the launches exit at once and write only zeros into fresh buffers. Returns launches made."""
    N = 1
    slots = torch.zeros(N, dtype=torch.long, device=pool.device)
    ranks, r = [], 16
    while True:
        ranks.append(r)
        if r >= max_rank or r >= MAX_RANK:
            break
        r *= 2
    launches = 0
    for block_m in PREFILL_BLOCK_M:
        x = torch.zeros((N, block_m, d_in), dtype=pool.dtype, device=pool.device)
        for split in sorted({1, prefill_max_split(d_in)}):
            for rank in ranks:
                cfg = {"block_m": block_m, "split": split}
                _group_deltas_rows(x, pool, scales, slots, members, d_in, rank, cfg)
                launches += 1
                if gated and len(members) == 2 and members[0].out == members[1].out:
                    g = torch.zeros((N, block_m, members[0].out), dtype=pool.dtype, device=pool.device)
                    group_gated_act(x, g, g.clone(), pool, scales, slots, members, d_in, rank, cfg)
                    launches += 1
    return launches


def _a_args(members) -> list[int]:
    """``A0, S0, A1, S1, A2, S2``: each member's A offset in the pool row and its scalings row
    (absent members repeat the first; the kernels never read them)."""
    args: list[int] = []
    for i in range(GROUP_MAX_MEMBERS):
        m = members[i] if i < len(members) else members[0]
        args += [m.a_off, m.scale_row]
    return args


def _b_args(members, tiles: list[int], tokens: int) -> list[int]:
    """``B0, O0, D0, T0, B1, O1, D1, T1, B2, O2, D2``: per member its B^T offset in the pool row,
    its outputs, where its delta starts in the buffer and its output tiles."""
    args: list[int] = []
    d_off = 0
    for i in range(GROUP_MAX_MEMBERS):
        last = i == GROUP_MAX_MEMBERS - 1
        if i < len(members):
            args += [members[i].b_off, members[i].out, d_off * tokens] + ([] if last else [tiles[i]])
            d_off += members[i].out
        else:
            args += [0, 1, 0] + ([] if last else [0])
    return args


def _split_buffer(buf: torch.Tensor, lead: tuple[int, ...], outs: list[int]) -> list[torch.Tensor]:
    """Each member's contiguous ``[*lead, out_m]`` slice of the group's delta buffer."""
    tokens = 1
    for d in lead:
        tokens *= d
    out, start = [], 0
    for o in outs:
        out.append(buf[start * tokens:(start + o) * tokens].view(*lead, o))
        start += o
    return out
