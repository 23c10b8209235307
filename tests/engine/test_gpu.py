"""bf16 on CUDA: rows match PEFT within 2e-2, loads use pinned staging, and
allocated memory returns to its start after load/evict cycles."""
from __future__ import annotations

import pytest
import torch

from conftest import load_base, load_peft, rel_err
from handler.engine.multilora import MultiLoraModel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NAMES = ["r4", "r8qv", "r16rs", "r64", "patterned"]


def test_bf16_mixed_batch_matches_peft(tiny_model_dir, engine_adapters):
    dev = "cuda"
    ml = MultiLoraModel(load_base(tiny_model_dir, torch.bfloat16, dev), max_adapters=6, max_rank=64)
    for n in NAMES:
        ml.load_adapter(engine_adapters[n], n)
    assert ml._staging is not None and ml._staging.is_pinned()
    pm = load_peft(tiny_model_dir, {n: engine_adapters[n] for n in NAMES}, torch.bfloat16, dev)
    torch.manual_seed(0)
    rows = NAMES + [None]
    ids = torch.randint(3, 300, (len(rows), 16), device=dev)
    with torch.no_grad():
        ours = ml(ids, adapter_names=rows).logits
        for i, n in enumerate(rows):
            if n is None:
                with pm.disable_adapter():
                    ref = pm(input_ids=ids[i:i + 1]).logits[0]
            else:
                pm.set_adapter(n)
                ref = pm(input_ids=ids[i:i + 1]).logits[0]
            assert rel_err(ours[i], ref) <= 2e-2, n


def test_cuda_memory_returns_after_cycles(tiny_model_dir, engine_adapters):
    ml = MultiLoraModel(load_base(tiny_model_dir, torch.bfloat16, "cuda"), max_adapters=2, max_rank=64)
    ml.load_adapter(engine_adapters["r64"], "warm")  # allocates the staging buffer once
    ml.delete_adapter("warm")
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for i in range(200):
        name = NAMES[i % len(NAMES)]
        ml.load_adapter(engine_adapters[name], name)
        ml.delete_adapter(name)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start
    assert not ml.pool.any()
