"""The grouped PEFT engine copes with 'no adapter yet' and 'last adapter deleted'."""
from __future__ import annotations

import torch

from conftest import load_base
from handler.engine import GenerationRow, SamplingParams
from handler.engine.peft_engine import PeftGroupedEngine
from handler.engine.settings import EngineSettings


def _has_lora_layers(model) -> bool:
    return any(hasattr(m, "lora_A") for m in model.modules())


def test_bare_model_until_first_load_and_after_last_delete(tiny_model_dir, tokenizer, engine_adapters, base_model):
    eng = PeftGroupedEngine(load_base(tiny_model_dir), eos_token_ids=[tokenizer.eos_token_id],
                            pad_token_id=tokenizer.pad_token_id, settings=EngineSettings(num_slots=5, max_rank=64))
    assert eng.peft_model is None
    rows = [GenerationRow([5, 6, 7], None, SamplingParams(max_new_tokens=5)),
            GenerationRow([9, 10], None, SamplingParams(max_new_tokens=5))]
    before = eng.generate(rows)
    want = base_model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, 3:].tolist()
    if tokenizer.eos_token_id not in want:
        assert before[0].token_ids == want
    for cycle in range(3):
        eng.load_adapter(str(engine_adapters["r4"]), "r4")
        eng.load_adapter(str(engine_adapters["r8qv"]), "r8qv")
        assert _has_lora_layers(eng.base)
        eng.delete_adapter("r4")
        eng.delete_adapter("r8qv")
        assert eng.peft_model is None and not _has_lora_layers(eng.base)
        assert eng.generate(rows) == before
