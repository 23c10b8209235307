"""Each row of a mixed batch through the slot pool matches PEFT's single-adapter
forward on that row (fp32, relative logit error <= 1e-5); base rows match the
unwrapped model; greedy generations are identical to PEFT's."""
from __future__ import annotations

import pytest
import torch

from conftest import load_base, peft_row_logits, rel_err
from handler.engine.multilora import MultiLoraModel
from handler.engine.settings import EngineSettings

NAMES = ["r4", "r8qv", "r16rs", "r64", "r16mlp", "r8rs", "patterned"]


@pytest.fixture(scope="module")
def ml(tiny_model_dir, engine_adapters):
    m = MultiLoraModel(load_base(tiny_model_dir), settings=EngineSettings(num_slots=9, max_rank=64))
    for name in NAMES:
        m.load_adapter(engine_adapters[name], name)
    return m


def test_mixed_batch_rows_match_peft_single_adapter(ml, peft_oracle, base_model):
    torch.manual_seed(0)
    rows = NAMES + [None, "r4", "__base__"]
    ids = torch.randint(3, 300, (len(rows), 12))
    with torch.no_grad():
        ours = ml(ids, adapter_names=rows).logits
        base = base_model(input_ids=ids).logits
    for i, name in enumerate(rows):
        ref = peft_row_logits(peft_oracle, None if name == "__base__" else name, ids[i])
        assert rel_err(ours[i], ref) <= 1e-5, (name, rel_err(ours[i], ref))
        if name in (None, "__base__"):
            assert torch.equal(ours[i], base[i])  # slot 0 adds exact zeros
        else:  # and the adapter really changed something
            assert rel_err(ours[i], base[i]) > 1e-3, name


def test_uniform_batch_fast_path_matches_peft(ml, peft_oracle):
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 9))
    for name in ("r64", "patterned", "r8qv"):
        ml.set_adapter(name)
        with torch.no_grad():
            ours = ml(ids).logits  # no adapter_names: every row uses the active adapter
        for i in range(3):
            assert rel_err(ours[i], peft_row_logits(peft_oracle, name, ids[i])) <= 1e-5


def test_rank_and_alpha_patterns_are_honoured(ml):
    layers = ml.lora_layers
    slot = ml.slot_of("patterned")
    q = layers["model.layers.0.self_attn.q_proj"]
    v = layers["model.layers.0.self_attn.v_proj"]
    up1 = layers["model.layers.1.mlp.up_proj"]
    down = layers["model.layers.0.mlp.down_proj"]
    assert q.slot_rank[slot] == 4 and q.slot_scale[slot] == pytest.approx(16 / 4)
    assert v.slot_rank[slot] == 8 and v.slot_scale[slot] == pytest.approx(64 / 8)
    assert up1.slot_scale[slot] == pytest.approx(3 / 8)
    assert down.slot_rank[slot] == 12


def test_greedy_generation_identical_to_peft(ml, peft_oracle):
    torch.manual_seed(2)
    rows = ["r4", "r16rs", None, "r64", "r8rs"]
    ids = torch.randint(3, 300, (len(rows), 7))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ours = ml.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                with peft_oracle.disable_adapter():
                    ref = peft_oracle.generate(input_ids=ids[i:i + 1], **kw)
            else:
                peft_oracle.set_adapter(name)
                ref = peft_oracle.generate(input_ids=ids[i:i + 1], **kw)
        assert ours[i].tolist() == ref[0].tolist(), name


def test_matches_peft_mixed_batch_api_too(ml, peft_oracle):
    torch.manual_seed(3)
    rows = ["r8qv", "__base__", "r16mlp", "r8qv"]
    ids = torch.randint(3, 300, (4, 10))
    with torch.no_grad():
        ours = ml(ids, adapter_names=rows).logits
        ref = peft_oracle(input_ids=ids, adapter_names=rows).logits
    assert rel_err(ours, ref) <= 1e-5


def test_adapter_targeting_some_modules_leaves_others_untouched(ml):
    slot = ml.slot_of("r8qv")
    for name, layer in ml.lora_layers.items():
        targeted = name.endswith(("q_proj", "v_proj"))
        assert (layer.slot_rank[slot] == 8) == targeted
        if not targeted:
            assert not layer.lora_A[slot].any() and not layer.lora_Bt[slot].any()
