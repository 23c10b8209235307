"""Every adapter the engines refuse is refused at load, with a message naming
the problem, by both engines, and leaves the engine unchanged. (The rules and their
messages are `loraplex_common.adapter_format`'s, shared with onboarding:
tests/test_adapter_format.py holds the two sides against each other.)"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from handler.engine import (AdapterAlreadyLoaded, AdapterFormatError, AdapterNotLoaded, EngineError,
                            EngineSettings, GenerationRow, NoFreeSlot, UnsupportedAdapter, make_engine)
from loraplex_testing.models import make_lora_with_config


def load_base(model_dir: Path, dtype=torch.float32, device="cpu"):
    """The tiny base model (not conftest's helper: `from conftest import` breaks when tests/handler,
    which has a conftest of its own, is collected in the same run)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()

KINDS = ["multilora", "peft"]


def _copy(src: Path, dst: Path, *, config=None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        sd = load_file(str(dst / "adapter_model.safetensors"))
        tensors(sd)
        save_file(sd, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def bad(tiny_model_dir, engine_adapters, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-adapters")
    good = engine_adapters["r4"]
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    k1 = "base_model.model.model.layers.1.self_attn.k_proj"

    def drop_b(sd):
        del sd[f"{q0}.lora_B.weight"]

    def drop_module(sd):
        del sd[f"{k1}.lora_A.weight"], sd[f"{k1}.lora_B.weight"]

    def extra(sd):
        sd[f"{q0}.lora_C.weight"] = torch.zeros(2, 2)

    def wrong_shape(sd):
        sd[f"{q0}.lora_A.weight"] = torch.zeros(4, 65)

    no_weights = _copy(good, root / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    no_config = _copy(good, root / "no_config")
    (no_config / "adapter_config.json").unlink()
    return {
        "dora": make_lora_with_config(tiny_model_dir, root / "dora", r=4, lora_alpha=8, target_modules=["q_proj"],
                                      use_dora=True),
        "lm_head": make_lora_with_config(tiny_model_dir, root / "lm_head", r=4, lora_alpha=8,
                                         target_modules=["q_proj", "lm_head"]),
        "embedding": make_lora_with_config(tiny_model_dir, root / "embedding", r=4, lora_alpha=8,
                                           target_modules=["embed_tokens"]),
        "bias": _copy(good, root / "bias", config={"bias": "all"}),
        "ia3": _copy(good, root / "ia3", config={"peft_type": "IA3"}),
        "r_mismatch": _copy(good, root / "r_mismatch", config={"r": 8}),
        "missing_b": _copy(good, root / "missing_b", tensors=drop_b),
        "missing_module": _copy(good, root / "missing_module", tensors=drop_module),
        "unexpected": _copy(good, root / "unexpected", tensors=extra),
        "wrong_shape": _copy(good, root / "wrong_shape", tensors=wrong_shape),
        "no_weights": no_weights,
        "no_config": no_config,
    }


CASES = [
    ("dora", UnsupportedAdapter, "DoRA"),
    ("bias", UnsupportedAdapter, 'bias must be "none", got \'all\''),
    ("ia3", UnsupportedAdapter, 'peft_type must be "LORA", got \'IA3\''),
    ("lm_head", UnsupportedAdapter, "module 'lm_head' is not an allowed target"),
    ("embedding", UnsupportedAdapter, "embedding layer"),
    ("r_mismatch", AdapterFormatError, "shape mismatch for 'model.layers.0.mlp.down_proj'"),
    ("missing_b", AdapterFormatError, "module 'model.layers.0.self_attn.q_proj' has no lora_B.weight"),
    ("missing_module", AdapterFormatError, "missing tensors for 1 targeted module(s), e.g. 'model.layers.1.self_attn.k_proj'"),
    ("unexpected", AdapterFormatError, "unexpected tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight'"),
    ("wrong_shape", AdapterFormatError, "lora_A [4, 65]"),
    ("no_weights", AdapterFormatError, "no adapter_model.safetensors"),
    ("no_config", AdapterFormatError, "no adapter_config.json"),
]


def _engine(kind, tiny_model_dir, tokenizer, **kw):
    settings = EngineSettings(**{"num_slots": 4, "max_rank": 32, **kw})
    return make_engine(kind, load_base(tiny_model_dir), settings, eos_token_ids=[tokenizer.eos_token_id],
                       pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module", params=KINDS)
def engine(request, tiny_model_dir, tokenizer, engine_adapters):
    eng = _engine(request.param, tiny_model_dir, tokenizer)
    eng.load_adapter(str(engine_adapters["r8qv"]), "resident")
    return eng


def _pool_outside(eng, slots_in_use):
    pool = eng.model.pool
    return torch.cat([pool[s] for s in range(1, pool.shape[0]) if s not in slots_in_use]) if eng.kind == "multilora" else None


@pytest.mark.parametrize("case,exc,message", CASES, ids=[c[0] for c in CASES])
def test_refused_with_clear_message_and_no_trace(engine, bad, case, exc, message):
    before = engine.get_model_status()
    with pytest.raises(exc) as info:
        engine.load_adapter(str(bad[case]), "x")
    assert message in str(info.value)
    assert isinstance(info.value, EngineError) and isinstance(info.value, ValueError)
    assert engine.get_model_status() == before
    if engine.kind == "multilora":  # nothing was written into any free slot
        assert not _pool_outside(engine, {engine.model.slot_of("resident")}).any()


def test_rank_above_pool_max_is_refused(engine, engine_adapters):
    with pytest.raises(UnsupportedAdapter, match="rank 64 of 'model.layers.0.mlp.down_proj' exceeds the maximum rank 32"):
        engine.load_adapter(str(engine_adapters["r64"]), "big")


def test_name_already_loaded_is_refused(engine, engine_adapters):
    with pytest.raises(AdapterAlreadyLoaded, match="adapter 'resident' is already loaded; delete it first"):
        engine.load_adapter(str(engine_adapters["r4"]), "resident")


def test_unknown_names_are_refused(engine):
    with pytest.raises(AdapterNotLoaded, match="adapter 'nope' is not loaded"):
        engine.set_adapter("nope")
    with pytest.raises(AdapterNotLoaded, match="adapter 'nope' is not loaded"):
        engine.delete_adapter("nope")
    with pytest.raises(AdapterNotLoaded, match="adapter 'nope' is not loaded"):
        engine.generate([GenerationRow(input_ids=[5, 6], adapter="nope")])
    with pytest.raises(EngineError, match="invalid adapter name '__base__'"):
        engine.load_adapter("/nonexistent", "__base__")


@pytest.mark.parametrize("kind", KINDS)
def test_no_free_slot(kind, tiny_model_dir, tokenizer, engine_adapters):
    eng = _engine(kind, tiny_model_dir, tokenizer, num_slots=3)
    eng.load_adapter(str(engine_adapters["r4"]), "one")
    eng.load_adapter(str(engine_adapters["r8qv"]), "two")
    with pytest.raises(NoFreeSlot, match="no free adapter slot: all 2 are in use"):
        eng.load_adapter(str(engine_adapters["r16mlp"]), "three")
    eng.delete_adapter("one")
    assert eng.load_adapter(str(engine_adapters["r16mlp"]), "three").name == "three"


@pytest.mark.parametrize("kind", KINDS)
def test_target_not_wrapped_by_engine_config(kind, tiny_model_dir, tokenizer, engine_adapters):
    eng = _engine(kind, tiny_model_dir, tokenizer, target_modules=("q_proj",))
    with pytest.raises(UnsupportedAdapter, match=re.escape("module 'model.layers.0.self_attn.v_proj' is not an allowed target (allowed: q_proj)")):
        eng.load_adapter(str(engine_adapters["r8qv"]), "qv")


def test_unknown_engine_kind():
    with pytest.raises(ValueError, match="unknown engine kind 'vllm'"):
        make_engine("vllm", torch.nn.Linear(2, 2), EngineSettings(num_slots=2, max_rank=1), eos_token_ids=[0],
                    pad_token_id=0)
