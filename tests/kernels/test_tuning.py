"""`kernels.tuning`, the benches' entry point: under the default launch shape its launchers give
what the engine's own entry points give (Triton's interpreter on a CPU, compiled on CUDA)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from handler.engine.kernels import triton_lora as tl_lora
from handler.engine.kernels import tuning

from .test_group_decode import DEV, _members, _pool
from .test_triton_lora import make_pool

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not tl_lora.available(),
                                reason="needs triton (compiled on CUDA, or its CPU interpreter)")


def test_add_mixed_and_shrink_under_a_config_match_the_public_launch():
    gen = torch.Generator().manual_seed(5)
    A, Bt, scaling = make_pool(4, 16, 96, 40, [0, 16, 5, 9], torch.float32, DEV, gen)
    x = torch.randn(5, 3, 96, generator=gen).to(DEV)
    slots = torch.tensor([1, 0, 2, 3, 1], device=DEV)
    want = torch.zeros(5, 3, 40, device=DEV)
    tl_lora.add_mixed_triton_(want, x, slots, A, Bt, scaling, 16)
    for over in ({}, {"split": 2, "block_k": 32}):
        cfg = tuning.choose_config(5, 3, 96, 40, 16, torch.float32, **over)
        got = torch.zeros_like(want)
        tuning.add_mixed_with_config(got, x, slots, A, Bt, scaling, 16, cfg)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), over
        parts = tuning.shrink_into(tuning.shrink_partials(cfg, 15, DEV), x, A, slots, scaling, 16, cfg)
        token_slots = slots.repeat_interleave(3)
        xa = (x.reshape(15, 1, 96) @ A[token_slots].transpose(1, 2)).view(15, 16) * scaling[token_slots][:, None]
        used = token_slots != 0  # tokens of slot-0 rows are never written (nor read by the expand)
        assert torch.allclose(parts.sum(0)[used][:, :16], xa[used], atol=1e-5, rtol=1e-4), over
    assert tuning.pdl_enabled("cpu") is False


def test_group_prefill_deltas_match_group_deltas_triton():
    gen = torch.Generator().manual_seed(6)
    outs, d_in = [24, 8], 40
    pool, scales, offs = _pool(3, d_in, outs, 8, [[0, 0], [8, 4], [3, 8]], torch.float32, gen)
    members = _members(offs, outs)
    x = torch.randn(3, 5, d_in, generator=gen).to(DEV)
    slots = torch.tensor([2, 0, 1], device=DEV)
    want = tl_lora.group_deltas_triton(x, pool, scales, slots, members, d_in, 8)
    got = tuning.group_prefill_deltas(x, pool, scales, slots, members, d_in, 8, {"block_m": 16, "block_o": 64})
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)
    assert tuning.decode_linear_shape(32, 2048, 2048, fp32=False) == tl_lora._decode_linear_shape(32, 2048, 2048, False)
