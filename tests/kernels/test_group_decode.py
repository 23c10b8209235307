"""The group kernels (`kernels.group_deltas_triton`) and their use by the layers.

One shrink and one expand launch compute the LoRA deltas of up to three linears
that read the same input, straight from the slot-major pool, for a decode step
(one token per row, grouped by slot) and for prefill (many tokens per row); each
member's delta must equal the reference math for every row (slot 0 rows: zeros). Runs through Triton's CPU
interpreter when there is no GPU (conftest sets TRITON_INTERPRET=1), compiled
on a GPU; skipped where triton is missing.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from handler.engine.kernels import triton_lora as tl_lora
from handler.engine import lora_ops as ops
from handler.engine.settings import EngineSettings

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not tl_lora.available(),
                                reason="needs triton (compiled on CUDA, or its CPU interpreter)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _pool(K, d_in, outs, r_max, ranks, dtype, gen):
    """A [K, P] pool holding, per member, an A block [r_max, in] and a B^T block [r_max, out]."""
    offs, p = [], 0
    for o in outs:
        a_off = p
        p += r_max * d_in + 3  # odd gaps: offsets need not be aligned
        b_off = p
        p += r_max * o + 5
        offs.append((a_off, b_off))
    pool = torch.zeros(K, p, dtype=torch.float64)
    scales = torch.zeros(len(outs) + 1, K, dtype=torch.float64)  # row 0 unused: members use rows 1..M
    for k in range(1, K):
        for m, ((a_off, b_off), o) in enumerate(zip(offs, outs)):
            r = ranks[k][m]
            pool[k, a_off: a_off + r * d_in] = torch.randn(r * d_in, generator=gen, dtype=torch.float64) / d_in ** 0.5
            pool[k, b_off: b_off + r * o] = torch.randn(r * o, generator=gen, dtype=torch.float64) / max(r, 1) ** 0.5
            scales[m + 1, k] = 0.5 + torch.rand((), generator=gen, dtype=torch.float64).item()
    return pool.to(DEV, dtype), scales.to(DEV, dtype), offs


def _members(offs, outs):
    return [tl_lora.GroupMember(a_off=a, b_off=b, out=o, scale_row=m + 1)
            for m, ((a, b), o) in enumerate(zip(offs, outs))]


def _check_against_reference(deltas, x, slots, pool, scales, offs, outs, d_in, r_max, dtype, zero_rows_exact=True):
    N, S = x.shape[:2]
    K = pool.shape[0]
    assert len(deltas) == len(outs)
    for m, ((a_off, b_off), o) in enumerate(zip(offs, outs)):
        A = pool.double().cpu()[:, a_off: a_off + r_max * d_in].view(K, r_max, d_in)
        Bt = pool.double().cpu()[:, b_off: b_off + r_max * o].view(K, r_max, o)
        ref = ops.lora_delta_reference(x, slots, A, Bt.transpose(1, 2), scales.double().cpu()[m + 1])
        got = deltas[m].double().cpu().view(N, S, o)
        assert deltas[m].is_contiguous()
        err = (got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert err <= TOL[dtype], (m, float(err))
        if zero_rows_exact:
            assert torch.equal(got[slots == 0], torch.zeros_like(got[slots == 0]))


def _case(N, outs, d_in, seed):
    gen = torch.Generator().manual_seed(seed)
    K, r_max = 6, 16
    ranks = [[0] * len(outs)] + [[int(torch.randint(1, 9, (), generator=gen)) for _ in outs] for _ in range(K - 1)]
    ranks[2][0] = 8  # the largest rank = the rank passed to the kernel
    slots = torch.randint(0, K, (N,), generator=gen)
    slots[0] = 2
    if N > 2:
        slots[-1] = 0
        slots[1] = 2
    return gen, K, r_max, ranks, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,outs,d_in", [(1, [24], 48), (5, [40, 8, 8], 48), (17, [136, 72], 48),
                                         (6, [24, 16, 16], 1100)])  # 1100: a 3-way k-split
def test_group_deltas_match_reference(dtype, N, outs, d_in):
    gen, K, r_max, ranks, slots = _case(N, outs, d_in, N)
    pool, scales, offs = _pool(K, d_in, outs, r_max, ranks, dtype, gen)
    x = torch.randn(N, d_in, generator=gen, dtype=torch.float64)
    deltas = tl_lora.group_deltas_triton(x.to(DEV, dtype), pool, scales, slots.to(DEV), _members(offs, outs), d_in, 8)
    assert all(d.shape == (N, o) for d, o in zip(deltas, outs))
    _check_against_reference(deltas, x.view(N, 1, d_in), slots, pool, scales, offs, outs, d_in, r_max, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,S,outs,d_in", [(3, 5, [40, 8, 8], 48),  # one token tile, three members
                                           (2, 70, [136, 72], 48),  # 70 tokens: two 64-token tiles, ragged
                                           (4, 3, [24], 2100)])  # few programs: a 2-way k-split
def test_group_prefill_deltas_match_reference(dtype, N, S, outs, d_in):
    """Prefill layout (x [N, S, in]): each row's adapter read from the pool in the kernel, x read
    once for every member, one delta buffer; partial token tiles and k-splits summed right."""
    gen, K, r_max, ranks, slots = _case(N, outs, d_in, 100 + N)
    pool, scales, offs = _pool(K, d_in, outs, r_max, ranks, dtype, gen)
    x = torch.randn(N, S, d_in, generator=gen, dtype=torch.float64)
    deltas = tl_lora.group_deltas_triton(x.to(DEV, dtype), pool, scales, slots.to(DEV), _members(offs, outs), d_in, 8)
    assert all(d.shape == (N, S, o) for d, o in zip(deltas, outs))
    _check_against_reference(deltas, x, slots, pool, scales, offs, outs, d_in, r_max, dtype)


def test_rejects_bad_inputs():
    pool = torch.zeros(3, 100, device=DEV)
    scales = torch.zeros(1, 3, device=DEV)
    m = tl_lora.GroupMember(0, 50, 4, 0)
    x = torch.zeros(2, 8, device=DEV)
    slots = torch.zeros(2, dtype=torch.long, device=DEV)
    with pytest.raises(AssertionError):
        tl_lora.group_deltas_triton(x, pool, scales, slots, [m] * 4, 8, 8)  # too many members
    with pytest.raises(AssertionError):
        tl_lora.group_deltas_triton(x, pool, scales, slots, [m], 8, 65)  # rank over 64
    with pytest.raises(AssertionError):
        tl_lora.group_deltas_triton(x.double(), pool, scales, slots, [m], 8, 8)  # dtype mismatch


def _count_launches(monkeypatch) -> list:
    """Record each group launch pair (the member count of the group it served)."""
    from handler.engine import kernels

    calls = []

    def counting(real):
        def launch(x, pool, scales, slots, members, *rest, **kw):
            calls.append(len(members))
            return real(x, pool, scales, slots, members, *rest, **kw)
        return launch

    for name in ("group_deltas_triton", "group_decode_linears"):  # prefill / decode step
        monkeypatch.setattr(kernels, name, counting(getattr(kernels, name)))

    def gated(real):  # an MLP's gate/up pair fused into its activation (`multilora.gated_mlp`)
        def launch(x, g, u, pool, scales, slots, members, *rest, **kw):
            calls.append(("gated", len(members)))
            return real(x, g, u, pool, scales, slots, members, *rest, **kw)
        return launch

    monkeypatch.setattr(kernels, "group_gated_act", gated(kernels.group_gated_act))
    return calls


def test_layers_group_qkv_and_gate_up_and_match_the_eager_path(tiny_model_dir, tiny_adapters, monkeypatch):
    """A static batch's single-token forward (what a graph captures) through the group launches
    gives the eager batch's logits; q/k/v and gate/up share a group, o and down are alone."""
    from transformers import AutoModelForCausalLM

    from handler.engine.multilora import MultiLoraModel

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).to(DEV).eval()
    ml = MultiLoraModel(base, settings=EngineSettings(num_slots=5, max_rank=64))
    names = sorted(tiny_adapters)[:3]
    for n in names:
        ml.load_adapter(tiny_adapters[n], n)
    layers = ml.lora_layers
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.group is layers["model.layers.0.self_attn.v_proj"].group is not None
    assert layers["model.layers.0.mlp.gate_proj"].group is layers["model.layers.0.mlp.up_proj"].group
    assert layers["model.layers.0.self_attn.o_proj"].group is not q.group
    rows = [names[0], None, names[1], names[2], names[0]]
    ids = torch.randint(3, 200, (len(rows), 1), device=DEV)
    launches = _count_launches(monkeypatch)
    with torch.inference_mode():
        eager = ml(input_ids=ids, adapter_names=rows, use_cache=False).logits
        assert launches == []  # an eager one-token forward takes the layers' own path
        slots = torch.tensor(ml.resolve_slots(rows, len(rows)), device=DEV)
        with ml.static_batch(slots, 16):
            static = ml.model(input_ids=ids, use_cache=False).logits
            assert not ml._ctx.group_outputs  # deltas released
    assert (static - eager).abs().max() / eager.abs().max() <= 1e-4
    n_layers = base.config.num_hidden_layers
    assert sorted(launches) == sorted([3, 1, 2, 1] * n_layers)  # per layer: q/k/v, o, gate/up, down
    with torch.inference_mode(), ml.disable_adapter():
        assert not torch.allclose(static, ml(input_ids=ids, use_cache=False).logits)  # adapters mattered


def test_prefill_runs_through_group_launches_and_matches_the_torch_path(tiny_model_dir, tiny_adapters, monkeypatch):
    """An eager multi-token forward (prefill) with the kernels on goes through one launch pair per
    group (gate/up: the MLP's fused activation) and gives the plain-torch path's logits, for a
    mixed batch with a base row; a batch whose rows name no adapter launches nothing, one whose
    rows all name the same adapter only the fused MLP; beam search is refused."""
    from transformers import AutoModelForCausalLM

    from handler.engine.errors import BatchShapeError

    from handler.engine.multilora import MultiLoraModel

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).to(DEV).eval()
    ml = MultiLoraModel(base, settings=EngineSettings(num_slots=5, max_rank=64))
    names = sorted(tiny_adapters)[:3]
    for n in names:
        ml.load_adapter(tiny_adapters[n], n)
    rows = [names[0], None, names[1], names[2]]
    ids = torch.randint(3, 200, (len(rows), 7), device=DEV)
    with torch.inference_mode():
        ml.set_lora_backend("torch")
        ref = ml(input_ids=ids, adapter_names=rows, use_cache=False).logits
        base_ref = ml(input_ids=ids, adapter_names=[None] * len(rows), use_cache=False).logits
        ml.set_lora_backend("triton")  # CPU: the kernels in Triton's interpreter
        launches = _count_launches(monkeypatch)
        got = ml(input_ids=ids, adapter_names=rows, use_cache=False).logits
        n_layers = base.config.num_hidden_layers
        assert sorted(launches, key=str) == sorted([3, 1, ("gated", 2), 1] * n_layers, key=str)
        assert not ml._ctx.group_outputs
        launches.clear()
        got_base = ml(input_ids=ids, adapter_names=[None] * len(rows), use_cache=False).logits
        assert launches == []
        single_ref = ml(input_ids=ids, adapter_names=[names[0]] * len(rows), use_cache=False).logits
        # one slot on every row: the layers' plain GEMMs serve q/k/v, o and down
        assert launches == [("gated", 2)] * n_layers
        ml.set_lora_backend("torch")
        single_torch = ml(input_ids=ids, adapter_names=[names[0]] * len(rows), use_cache=False).logits
        ml.set_lora_backend("triton")
        with pytest.raises(BatchShapeError, match="beam search"):  # rows no longer match the slots
            ml.generate(input_ids=ids[:2], adapter_names=rows[:2], num_beams=2, max_new_tokens=2, do_sample=False,
                        pad_token_id=0)
    assert (got - ref).abs().max() / ref.abs().max() <= 1e-4
    assert (single_ref - single_torch).abs().max() / single_torch.abs().max() <= 1e-4
    assert torch.equal(got_base, base_ref)
    assert not torch.allclose(got[0], base_ref[0])  # the adapter mattered



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,outs,d_in,rank", [(5, [40, 8, 8], 48, 8), (3, [24], 1100, 8),  # 3-way k-split
                                              (6, [72, 24], 64, 40),  # rank 40: three 16-rank epilogue chunks
                                              (40, [24, 8], 64, 8)])  # 40 rows: a 64-row tile, shorter k-steps
def test_group_decode_linears_match_base_plus_reference(dtype, N, outs, d_in, rank):
    """A decode step's group as one shrink + one GEMM per member with the expand in its
    epilogue: each member's output is x @ W.T plus the reference delta; slot-0 rows get the
    base output (their unwritten partials are never read)."""
    gen, K, _, ranks, slots = _case(N, outs, d_in, 200 + N)
    r_max = 64
    ranks[2][0] = rank
    pool, scales, offs = _pool(K, d_in, outs, r_max, ranks, dtype, gen)
    x = torch.randn(N, d_in, generator=gen, dtype=torch.float64)
    weights = [torch.randn(o, d_in, generator=gen, dtype=torch.float64) / d_in ** 0.5 for o in outs]
    ys = tl_lora.group_decode_linears(x.to(DEV, dtype), pool, scales, slots.to(DEV), _members(offs, outs),
                                      [w.to(DEV, dtype) for w in weights], d_in, rank)
    assert [tuple(y.shape) for y in ys] == [(N, o) for o in outs]
    xr = x.to(dtype).double()
    deltas = [y.double().cpu() - xr @ w.to(dtype).double().t() for y, w in zip(ys, weights)]
    _check_against_reference(deltas, x.view(N, 1, d_in), slots, pool, scales, offs, outs, d_in, r_max, dtype,
                             zero_rows_exact=False)  # base rows: GEMM rounding only, within the tolerance
