"""Triton LoRA kernels (`handler.engine.kernels`) against `ops.lora_delta_reference`.

* GPU tests (`@pytest.mark.gpu`): many random shapes, fp32/bf16/fp16, CUDA-graph
  replay with new slots, torch.compile through the custom op. Skipped without
  CUDA or triton.
* Interpreter tests: a few small shapes through Triton's CPU interpreter
  (TRITON_INTERPRET=1, set here before the kernels are first imported) when
  triton is installed and there is no GPU (CI: the `test` extra installs it);
  skipped when triton is missing.
* Always: the package imports without triton, and the custom op (CPU fallback
  to the plain-torch path) passes `torch.library.opcheck` and traces under
  torch.compile.
"""
from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and importlib.util.find_spec("triton") is not None:
    # Must be set before triton is first imported (triton caches it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from handler.engine.kernels import triton_lora as tl_lora  # noqa: E402

HAS_TRITON = tl_lora._triton_importable()  # False also for a broken install
from handler.engine import lora_ops as ops  # noqa: E402

gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")
interp = pytest.mark.skipif(HAS_CUDA or not HAS_TRITON, reason="interpreter tests: triton installed, no GPU")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make_pool(K, r_max, d_in, d_out, ranks, dtype, device, gen):
    """Pool with zero padding past each slot's rank; slot 0 all zeros."""
    A = torch.zeros(K, r_max, d_in, dtype=torch.float64)
    Bt = torch.zeros(K, r_max, d_out, dtype=torch.float64)
    scaling = torch.zeros(K, dtype=torch.float64)
    for k in range(1, K):
        r = ranks[k]
        A[k, :r] = torch.randn(r, d_in, generator=gen, dtype=torch.float64) / d_in ** 0.5
        Bt[k, :r] = torch.randn(r, d_out, generator=gen, dtype=torch.float64) / r ** 0.5
        scaling[k] = 0.5 + torch.rand((), generator=gen, dtype=torch.float64).item()
    return (A.to(device, dtype), Bt.to(device, dtype), scaling.to(device, dtype))


def check_case(device, dtype, N, S, d_in, d_out, r_max, r_used, K=7, seed=0, slots=None, x_strided=False,
               slot_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    ranks = [0] + [int(torch.randint(1, r_used + 1, (), generator=gen)) for _ in range(K - 1)]
    ranks[1] = r_used  # the largest rank in the pool = the rank passed to the kernel
    A, Bt, scaling = make_pool(K, r_max, d_in, d_out, ranks, dtype, device, gen)
    if slots is None:
        slots = torch.randint(0, K, (N,), generator=gen)
        slots[0] = 1
        if N > 2:
            slots[-1] = 0  # a base-model row
        if N > 3:
            slots[N // 2] = slots[1]  # a repeated slot
    slots = torch.as_tensor(slots).to(device, slot_dtype)
    x64 = torch.randn(N, S, d_in, generator=gen, dtype=torch.float64)
    base64 = torch.randn(N, S, d_out, generator=gen, dtype=torch.float64)
    if x_strided:  # rows/tokens not densely packed (a slice of a bigger buffer)
        big = torch.randn(N, S + 2, d_in + 5, dtype=torch.float64, generator=gen)
        big[:, 1:S + 1, 3:d_in + 3] = x64
        x = big.to(device, dtype)[:, 1:S + 1, 3:d_in + 3]
        bigo = torch.randn(N, S + 1, d_out + 3, dtype=torch.float64, generator=gen)
        bigo[:, :S, :d_out] = base64
        out = bigo.to(device, dtype)[:, :S, :d_out]
    else:
        x = x64.to(device, dtype)
        out = base64.to(device, dtype)
    base = out.clone()
    delta = ops.lora_delta_reference(x.double().cpu(), slots.long().cpu(), A.double().cpu(),
                                     Bt.double().cpu().transpose(1, 2), scaling.double().cpu())
    ret = tl_lora.add_mixed_triton_(out, x, slots, A, Bt, scaling, r_used)
    assert ret is out
    got = out.double().cpu()
    ref = base.double().cpu() + delta
    err = (got - ref).norm() / ref.norm()
    derr = ((got - base.double().cpu()) - delta).norm() / delta.norm().clamp_min(1e-30)
    assert torch.isfinite(got).all()
    assert err <= TOL[dtype], f"relative error {err:.3e} > {TOL[dtype]} ({dtype}, N={N}, S={S}, {d_in}->{d_out})"
    assert derr <= TOL[dtype] * (3 if dtype != torch.float32 else 1), f"delta error {derr:.3e}"
    zero_rows = (slots.cpu() == 0).nonzero().flatten().tolist()
    for n in zero_rows:  # slot-0 rows are not touched at all
        assert torch.equal(out[n], base[n])
    return err


# --------------------------------------------------------------------------
# always (no triton needed)
# --------------------------------------------------------------------------
def test_imports_without_triton_and_available_is_bool():
    assert isinstance(tl_lora.available(), bool)
    if not HAS_TRITON:
        assert tl_lora.available() is False


def test_choose_config_shapes():
    for N, S, d_in, r in [(1, 1, 2048, 16), (32, 1, 14336, 16), (200, 1, 4096, 64), (32, 256, 8192, 16),
                          (1, 7, 100, 1)]:
        cfg = tl_lora.choose_config(N, S, d_in, 4096, r, torch.bfloat16)
        assert cfg.block_r >= max(16, r) and cfg.block_r & (cfg.block_r - 1) == 0
        assert cfg.split * cfg.k_per_split >= d_in > (cfg.split - 1) * cfg.k_per_split
        assert cfg.k_per_split % cfg.block_k == 0
        assert cfg.grouped == (S == 1 and N <= tl_lora.GROUPED_MAX_ROWS)
        if cfg.grouped:
            assert cfg.block_n >= N


def _cpu_args(seed=0, N=5, S=3, d_in=24, d_out=20, r=4):
    gen = torch.Generator().manual_seed(seed)
    A, Bt, scaling = make_pool(4, 8, d_in, d_out, [0, r, r, 2], torch.float32, "cpu", gen)
    x = torch.randn(N, S, d_in, generator=gen)
    out = torch.randn(N, S, d_out, generator=gen)
    slots = torch.tensor([1, 0, 2, 1, 3][:N])
    return out, x, slots, A, Bt, scaling, r


def test_custom_op_opcheck_cpu():
    args = (*_cpu_args(), True)  # pdl: a decode launch may use PDL (no effect on a CPU)
    torch.library.opcheck(torch.ops.loraplex.add_mixed_lora_.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_custom_op_cpu_matches_reference_and_compiles():
    out, x, slots, A, Bt, scaling, r = _cpu_args(seed=1)
    base = out.clone()
    ref = base.double() + ops.lora_delta_reference(x.double(), slots, A.double(), Bt.double().transpose(1, 2),
                                                    scaling.double())
    tl_lora.add_mixed_triton_(out, x, slots, A, Bt, scaling, r)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5

    def f(o, x, slots):
        return tl_lora.add_mixed_triton_(o, x, slots, A, Bt, scaling, r) * 1.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out2 = base.clone()
    got = compiled(out2, x, slots)
    assert (got.double() - ref).norm() / ref.norm() < 1e-5
    assert torch.equal(out2, got)  # mutated in place through the compiled graph


def test_wrapper_rejects_bad_inputs():
    out, x, slots, A, Bt, scaling, r = _cpu_args()
    with pytest.raises(AssertionError):
        tl_lora.add_mixed_triton_(out, x, slots[:-1], A, Bt, scaling, r)
    with pytest.raises(AssertionError):
        tl_lora.add_mixed_triton_(out, x.double(), slots, A, Bt, scaling, r)
    with pytest.raises(AssertionError):
        tl_lora.add_mixed_triton_(out, x, slots, A, Bt, scaling, A.shape[1] + 1)
    with pytest.raises(AssertionError):
        tl_lora.add_mixed_triton_(out.transpose(1, 2).contiguous().transpose(1, 2), x, slots, A, Bt, scaling, r)


# --------------------------------------------------------------------------
# Triton CPU interpreter (dev machines with triton, no GPU); kept small
# --------------------------------------------------------------------------
INTERP_CASES = [
    # dtype, N, S, in, out, r_max, r_used
    (torch.float32, 5, 1, 100, 130, 16, 12),  # decode, grouped
    (torch.float32, 3, 7, 75, 66, 8, 5),  # short prefill, row layout
    (torch.bfloat16, 4, 1, 90, 70, 64, 33),  # bf16 decode, BLOCK_R 64
    (torch.bfloat16, 2, 20, 150, 40, 16, 16),  # bf16 prefill, BLOCK_M 32
]


@interp
@pytest.mark.parametrize("case", INTERP_CASES, ids=lambda c: f"{str(c[0])[6:]}-N{c[1]}-S{c[2]}")
def test_interpreter_matches_reference(case):
    dtype, N, S, d_in, d_out, r_max, r_used = case
    check_case("cpu", dtype, N, S, d_in, d_out, r_max, r_used, K=5, seed=N * 31 + S)


@interp
def test_interpreter_split_k_and_row_bgmv():
    # k-split (partials summed by the expand) and the ungrouped BGMV decode layout.
    gen = torch.Generator().manual_seed(3)
    A, Bt, scaling = make_pool(4, 16, 300, 50, [0, 16, 7, 3], torch.float32, "cpu", gen)
    x = torch.randn(6, 1, 300, generator=gen)
    slots = torch.tensor([1, 2, 0, 1, 3, 3])
    ref = ops.lora_delta_reference(x.double(), slots, A.double(), Bt.double().transpose(1, 2), scaling.double())
    for over in (dict(split=3, block_k=32), dict(grouped=False, block_m=1, split=2, block_k=64)):
        cfg = tl_lora.choose_config(6, 1, 300, 50, 16, torch.float32, **over)
        out = torch.zeros(6, 1, 50)
        tl_lora._add_mixed_impl(out, x, slots, A, Bt, scaling, 16, cfg)
        assert (out.double() - ref).norm() / ref.norm() < 1e-5, over


@interp
def test_interpreter_shrink_expand_public():
    _shrink_expand(torch.device("cpu"), torch.float32, N=3, S=4, d_in=70, d_out=45, r=6)


def _shrink_expand(device, dtype, N, S, d_in, d_out, r):
    gen = torch.Generator().manual_seed(7)
    A, Bt, scaling = make_pool(4, 16, d_in, d_out, [0, r, r, r], dtype, device, gen)
    slots = torch.tensor([2, 0, 1, 2, 3, 1][:N], device=device)
    x = torch.randn(N * S, d_in, generator=gen).to(device, dtype)
    xa = tl_lora.lora_shrink(x, A, slots, S, scaling, r)
    assert xa.shape == (N * S, r) and xa.dtype == torch.float32
    s_tok = slots.cpu().repeat_interleave(S)
    ref_xa = torch.stack([x[t].double().cpu() @ A[s_tok[t], :r].double().cpu().T * scaling[s_tok[t]].double().cpu()
                          for t in range(N * S)])
    assert (xa.double().cpu() - ref_xa).norm() / ref_xa.norm() < TOL[dtype]
    out = torch.randn(N * S, d_out, generator=gen).to(device, dtype)
    base = out.clone()
    tl_lora.lora_expand_add_(out, xa.contiguous(), Bt, slots, S)
    ref = base.double().cpu() + torch.stack([ref_xa[t] @ Bt[s_tok[t], :r].double().cpu() for t in range(N * S)])
    assert (out.double().cpu() - ref).norm() / ref.norm() < TOL[dtype]


# --------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------
def _gpu_cases():
    rng = random.Random(1234)
    cases = []
    for i in range(36):
        dtype = torch.float32 if i % 3 == 0 else torch.bfloat16
        S = (1, 7, 64)[i % 3 if i % 2 else (i // 2) % 3]
        N = rng.randint(1, 33)
        d_in = rng.randint(64, 2048)
        d_out = rng.randint(64, 2048)
        if d_in % 16 == 0:
            d_in += 3
        if d_out % 16 == 0:
            d_out += 5
        r_max = (4, 8, 16, 64)[i % 4]
        r_used = max(1, r_max - rng.randint(1, max(1, r_max // 2))) if r_max > 1 else 1
        cases.append((dtype, N, S, d_in, d_out, r_max, r_used))
    cases += [
        (torch.bfloat16, 33, 1, 2048, 2048, 64, 64),  # BLOCK_N 64, full rank 64
        (torch.bfloat16, 130, 1, 517, 1000, 16, 16),  # decode with N > 128: BGMV row layout
        (torch.float16, 9, 7, 1000, 300, 16, 13),
        (torch.bfloat16, 4, 64, 8192 + 17, 512, 16, 16),  # long `in`: k-split in prefill
        (torch.bfloat16, 32, 1, 14336, 4096, 16, 16),  # 8B down_proj decode
    ]
    return cases


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", _gpu_cases(), ids=lambda c: f"{str(c[0])[6:]}-N{c[1]}-S{c[2]}-{c[3]}x{c[4]}-r{c[6]}of{c[5]}")
def test_gpu_matches_reference(case):
    dtype, N, S, d_in, d_out, r_max, r_used = case
    check_case("cuda", dtype, N, S, d_in, d_out, r_max, r_used, K=9, seed=hash(case) % 10_000)


# Same sizes on both: the interpreter runs them in a few seconds (strided x/out, int32 slots,
# all-base / one-slot / all-distinct batches are layouts the small interpreter cases above lack).
@pytest.mark.parametrize("dev", [pytest.param("cuda", marks=(pytest.mark.gpu, gpu)), pytest.param("cpu", marks=interp)])
@pytest.mark.parametrize("S", [1, 7])
def test_special_slot_patterns_strides_int32(dev, S):
    N = 12
    for slots in ([0] * N, [3] * N, list(range(1, N + 1)), [0, 5] * (N // 2)):
        if all(s == 0 for s in slots):
            # every row base: nothing to compare against but "untouched"
            gen = torch.Generator().manual_seed(0)
            A, Bt, scaling = make_pool(13, 16, 100, 90, [0] + [16] * 12, torch.bfloat16, dev, gen)
            x = torch.randn(N, S, 100, device=dev, dtype=torch.bfloat16)
            out = torch.randn(N, S, 90, device=dev, dtype=torch.bfloat16)
            base = out.clone()
            tl_lora.add_mixed_triton_(out, x, torch.zeros(N, dtype=torch.long, device=dev), A, Bt, scaling, 16)
            assert torch.equal(out, base)
            continue
        check_case(dev, torch.bfloat16, N, S, 100, 90, 16, 16, K=13, slots=slots)
    check_case(dev, torch.float32, N, S, 300, 200, 16, 8, K=13, x_strided=True)
    check_case(dev, torch.bfloat16, N, S, 300, 200, 16, 8, K=13, slot_dtype=torch.int32)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("S", [1, 5])
def test_gpu_launch_variants_agree(S):
    """Every layout (grouped / row BGMV / SGMV, k-splits, PDL on and off) computes the same function."""
    gen = torch.Generator().manual_seed(11)
    N, d_in, d_out, K, r = 19, 1500, 900, 8, 16
    A, Bt, scaling = make_pool(K, r, d_in, d_out, [0] + [r] * (K - 1), torch.bfloat16, "cuda", gen)
    x = torch.randn(N, S, d_in, generator=gen).to("cuda", torch.bfloat16)
    slots = torch.tensor([0, 3, 3, 1, 7, 0, 3, 2, 2, 5, 6, 4, 1, 1, 7, 0, 3, 2, 6], device="cuda")
    ref = ops.lora_delta_reference(x.double().cpu(), slots.cpu(), A.double().cpu(), Bt.double().cpu().transpose(1, 2),
                                   scaling.double().cpu())
    overs = [{}, dict(split=1), dict(split=5), dict(block_o=64), dict(block_o=256, num_warps_expand=8)]
    if S == 1:
        overs += [dict(grouped=False, block_m=1, block_k=256), dict(grouped=False, block_m=16, block_k=64)]
    for pdl in (False, tl_lora._use_pdl(torch.device("cuda"))):
        for over in overs:
            cfg = tl_lora.choose_config(N, S, d_in, d_out, r, torch.bfloat16, pdl=pdl, **over)
            out = torch.zeros(N, S, d_out, device="cuda", dtype=torch.bfloat16)
            tl_lora._add_mixed_impl(out, x, slots, A, Bt, scaling, r, cfg)
            err = (out.double().cpu() - ref).norm() / ref.norm()
            assert err < 1e-2, (pdl, over, float(err))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_shrink_expand_public(dtype):
    _shrink_expand(torch.device("cuda"), dtype, N=5, S=3, d_in=700, d_out=450, r=12)
    _shrink_expand(torch.device("cuda"), dtype, N=6, S=1, d_in=700, d_out=450, r=12)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("S", [1, 7])
def test_gpu_cuda_graph_replay_with_new_slots(S):
    torch.manual_seed(0)
    N, d_in, d_out, K, r = 16, 1000, 700, 9, 16
    gen = torch.Generator().manual_seed(5)
    A, Bt, scaling = make_pool(K, r, d_in, d_out, [0] + [r] * (K - 1), torch.bfloat16, "cuda", gen)
    x = torch.randn(N, S, d_in, device="cuda", dtype=torch.bfloat16)
    base = torch.randn(N, S, d_out, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(base)
    slots = torch.randint(0, K, (N,), device="cuda")

    def step():
        out.copy_(base)
        tl_lora.add_mixed_triton_(out, x, slots, A, Bt, scaling, r)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile + warm up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for trial in range(4):
        new = torch.randint(0, K, (N,))
        new[trial] = 0
        slots.copy_(new)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        ref = base.double() + ops.lora_delta_reference(x.double().cpu(), new, A.double().cpu(),
                                                        Bt.double().cpu().transpose(1, 2),
                                                        scaling.double().cpu()).cuda()
        err = (out.double() - ref).norm() / ref.norm()
        assert err < 2e-2, f"replay {trial}: {err:.3e}"
        assert torch.equal(out[trial], base[trial])


@pytest.mark.gpu
@gpu
def test_gpu_torch_compile_fullgraph():
    torch._dynamo.reset()
    N, S, d_in, d_out, K, r = 8, 5, 512, 384, 5, 8
    gen = torch.Generator().manual_seed(9)
    A, Bt, scaling = make_pool(K, 16, d_in, d_out, [0] + [r] * (K - 1), torch.bfloat16, "cuda", gen)
    W = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) / d_in ** 0.5

    def layer(x, slots):
        out = x @ W.T
        tl_lora.add_mixed_triton_(out, x, slots, A, Bt, scaling, r)
        return out

    compiled = torch.compile(layer, fullgraph=True)
    for _ in range(2):
        x = torch.randn(N, S, d_in, device="cuda", dtype=torch.bfloat16)
        slots = torch.randint(0, K, (N,), device="cuda")
        ref = (x.double() @ W.double().T) + ops.lora_delta_reference(
            x.double().cpu(), slots.cpu(), A.double().cpu(), Bt.double().cpu().transpose(1, 2),
            scaling.double().cpu()).cuda()
        got = compiled(x, slots)
        assert (got.double() - ref).norm() / ref.norm() < 2e-2
