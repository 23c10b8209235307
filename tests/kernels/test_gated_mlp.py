"""A gated MLP's prefill with gate/up's LoRA fused into its activation
(`kernels.group_gated_act`, `multilora.gated_mlp`).

The kernel must give ``silu(g + Δg) * (u + Δu)`` with each row's adapter (zeros
for slot-0 rows) for ragged token tiles and k-split shrinks; the model must
install it on Llama MLPs only and fall back to the class's forward for every
batch it does not serve. Triton's CPU interpreter where there is no GPU.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from handler.engine.kernels import triton_lora as tl_lora
from handler.engine import lora_ops as ops

from .test_group_decode import DEV, TOL, _case, _members, _pool
from handler.engine.settings import EngineSettings

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not tl_lora.available(),
                                reason="needs triton (compiled on CUDA, or its CPU interpreter)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,S,inter,d_in", [(3, 5, 40, 48),  # one token tile, ragged output tile
                                            (3, 70, 136, 48),  # 70 tokens: two 64-token tiles
                                            (4, 3, 24, 2100)])  # few programs: a 2-way k-split
def test_gated_act_matches_reference(dtype, N, S, inter, d_in):
    outs = [inter, inter]
    gen, K, r_max, ranks, slots = _case(N, outs, d_in, 300 + N)
    pool, scales, offs = _pool(K, d_in, outs, r_max, ranks, dtype, gen)
    x = torch.randn(N, S, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(N, S, inter, generator=gen, dtype=torch.float64)
    u = torch.randn(N, S, inter, generator=gen, dtype=torch.float64)
    g_d, u_d = g.to(DEV, dtype), u.to(DEV, dtype)
    h = tl_lora.group_gated_act(x.to(DEV, dtype), g_d, u_d, pool, scales, slots.to(DEV), _members(offs, outs),
                                d_in, 8)
    assert h.shape == (N, S, inter) and h.dtype == dtype
    deltas = []
    for m, (a_off, b_off) in enumerate(offs):
        A = pool.double().cpu()[:, a_off: a_off + r_max * d_in].view(K, r_max, d_in)
        Bt = pool.double().cpu()[:, b_off: b_off + r_max * inter].view(K, r_max, inter)
        deltas.append(ops.lora_delta_reference(x, slots, A, Bt.transpose(1, 2), scales.double().cpu()[m + 1]))
    gq, uq = g_d.double().cpu(), u_d.double().cpu()  # the inputs as the kernel saw them
    ref = nn.functional.silu(gq + deltas[0]) * (uq + deltas[1])
    err = (h.double().cpu() - ref).abs().max() / ref.abs().max()
    assert err <= TOL[dtype], float(err)
    base_rows = slots == 0
    assert base_rows.any() and (~base_rows).any()
    plain = nn.functional.silu(gq) * uq
    assert torch.allclose(h.double().cpu()[base_rows], plain[base_rows], rtol=TOL[dtype], atol=TOL[dtype])
    assert not torch.allclose(h.double().cpu()[~base_rows], plain[~base_rows], rtol=TOL[dtype], atol=TOL[dtype])


def test_gated_act_rejects_bad_inputs():
    pool = torch.zeros(3, 400, device=DEV)
    scales = torch.zeros(2, 3, device=DEV)
    gate, up = tl_lora.GroupMember(0, 100, 8, 0), tl_lora.GroupMember(200, 300, 8, 1)
    x = torch.zeros(2, 4, 8, device=DEV)
    g = torch.zeros(2, 4, 8, device=DEV)
    slots = torch.zeros(2, dtype=torch.long, device=DEV)
    with pytest.raises(AssertionError):
        tl_lora.group_gated_act(x, g, g, pool, scales, slots, [gate], 8, 8)  # not a (gate, up) pair
    with pytest.raises(AssertionError):
        tl_lora.group_gated_act(x, g, g, pool, scales, slots, [gate, tl_lora.GroupMember(200, 300, 4, 1)], 8, 8)
    with pytest.raises(AssertionError):
        tl_lora.group_gated_act(x, g[:, :3], g, pool, scales, slots, [gate, up], 8, 8)  # gate output shape
    with pytest.raises(AssertionError):
        tl_lora.group_gated_act(x, g, g, pool, scales, slots, [gate, up], 8, 65)  # rank over 64


def test_installed_on_llama_mlps_only_and_falls_back(tiny_model_dir, tiny_adapters, monkeypatch):
    """Every Llama MLP with SiLU and no bias gets the fused forward (not with ``gated_mlp=False``,
    nor a GELU or biased MLP, whose math the kernel does not do); a one-token forward takes the
    class's forward; both match the engine without it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from handler.engine.multilora import MultiLoraModel
    from handler.engine.multilora.gated_mlp import GatedMlpForward

    def build(**kw):
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).to(DEV).eval()
        ml = MultiLoraModel(base, settings=EngineSettings(num_slots=5, max_rank=64), **kw)
        for n in sorted(tiny_adapters):
            ml.load_adapter(tiny_adapters[n], n)
        return base, ml

    base, ml = build()
    mlps = [layer.mlp for layer in base.model.layers]
    assert all(isinstance(m.__dict__.get("forward"), GatedMlpForward) for m in mlps)
    assert ml._gated_mlps == len(mlps) == base.config.num_hidden_layers
    for other in ({"hidden_act": "gelu"}, {"mlp_bias": True}):
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, **other)
        plain = MultiLoraModel(LlamaForCausalLM(cfg).to(DEV), settings=EngineSettings(num_slots=3, max_rank=8))
        assert plain._gated_mlps == 0, other
        assert "forward" not in plain.model.model.layers[0].mlp.__dict__
    assert ml.get_model_status()  # the facade still works with the forwards installed
    _, off = build(gated_mlp=False)
    assert not any("forward" in layer.mlp.__dict__ for layer in off.model.model.layers)
    rows = ["a", None, "b", "a"]
    ml.set_lora_backend("triton")
    with torch.inference_mode():
        for length in (1, 6):  # a one-token forward is never served by the fused path
            ids = torch.randint(3, 200, (len(rows), length), device=DEV)
            got = ml(input_ids=ids, adapter_names=rows, use_cache=False).logits
            want = off(input_ids=ids, adapter_names=rows, use_cache=False).logits
            assert (got - want).abs().max() / want.abs().max() <= 1e-4, length
