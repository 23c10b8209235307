"""`MultiLoraModel.warm_prefill_kernels` compiles every variant an eager CUDA prefill's group
kernels can launch: after it, prefills of any chunk length, row count and adapter-rank mix
compile nothing (Triton's JIT took seconds per variant on the request path before). That the
kernels' results do not change is tests/engine/test_gpu.py's job (prefill logits against PEFT)."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import load_base
from handler.engine import make_engine
from handler.engine.kernels import compiled_variants
from handler.engine.settings import EngineSettings

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ADAPTERS = ["r4", "r8qv", "r16rs", "r16mlp", "patterned", "r64"]


def test_no_compiles_after_prefill_warmup(tiny_model_dir, tokenizer, engine_adapters):
    eng = make_engine("multilora", load_base(tiny_model_dir, torch.bfloat16, "cuda"),
                      EngineSettings(num_slots=9, max_rank=64, decode="graphs"),
                      eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    for name in ADAPTERS:
        eng.load_adapter(str(engine_adapters[name]), name)
    facade = eng.model
    launches = facade.warm_prefill_kernels()
    assert launches > 0
    warmed = compiled_variants()
    assert facade.get_model_status()["triton_variants"] == warmed
    rng = random.Random(0)
    vocab = facade.model.get_input_embeddings().num_embeddings
    with torch.inference_mode():
        for _ in range(40):
            n, s = rng.randint(1, 6), rng.choice([2, 3, 7, 15, 16, 17, 31, 33, 63, 64, 65, 100, 129, 200])
            names = [rng.choice([None, *ADAPTERS]) for _ in range(n)]
            if len({x for x in names}) < 2:
                names[0] = "r64" if names[0] != "r64" else "r4"
            ids = torch.tensor([[rng.randrange(3, vocab) for _ in range(s)] for _ in range(n)], device="cuda")
            with facade.batch(names, n):
                facade.model(input_ids=ids)
    torch.cuda.synchronize()
    assert compiled_variants() == warmed, "an eager prefill compiled a kernel variant after warm_prefill_kernels"
