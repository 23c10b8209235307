"""`MultiLoraModel` keeps PEFT's names and meanings; both engines agree on the
state-changing calls (load does not activate, deleting the active adapter
leaves none active, disabled adapters mean base output)."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from conftest import load_base, peft_row_logits, rel_err
from handler.engine import BatchShapeError, GenerationRow, SamplingParams, make_engine
from handler.engine.multilora import MultiLoraModel
from handler.engine.settings import EngineSettings


@pytest.fixture()
def ml(tiny_model_dir, engine_adapters):
    m = MultiLoraModel(load_base(tiny_model_dir), settings=EngineSettings(num_slots=4, max_rank=64))
    m.load_adapter(engine_adapters["r4"], "r4")
    m.load_adapter(engine_adapters["r16rs"], "r16rs")
    return m


IDS = torch.arange(5, 17).view(2, 6)


def _logits(m, **kw):
    with torch.no_grad():
        return m(IDS, **kw).logits


def test_load_does_not_activate_and_set_adapter_selects_default(ml, base_model, peft_oracle):
    assert ml.active_adapter is None
    assert torch.equal(_logits(ml), base_model(input_ids=IDS).logits)
    ml.set_adapter("r16rs")
    assert ml.active_adapter == "r16rs" and ml.active_adapters == ["r16rs"]
    out = _logits(ml)
    assert rel_err(out[1], peft_row_logits(peft_oracle, "r16rs", IDS[1])) <= 1e-5
    # per-row names override the default; None / "__base__" = base
    mixed = _logits(ml, adapter_names=["r4", "__base__"])
    assert rel_err(mixed[0], peft_row_logits(peft_oracle, "r4", IDS[0])) <= 1e-5
    assert torch.equal(mixed[1], base_model(input_ids=IDS).logits[1])


def test_delete_active_adapter_leaves_none_active(ml, base_model):
    ml.set_adapter("r4")
    ml.delete_adapter("r4")
    assert ml.active_adapter is None  # not silently switched to "r16rs"
    assert torch.equal(_logits(ml), base_model(input_ids=IDS).logits)
    assert "r4" not in ml.peft_config


def test_disable_adapter_context_and_toggles(ml, base_model):
    base = base_model(input_ids=IDS).logits
    ml.set_adapter("r4")
    with pytest.raises(RuntimeError):
        with ml.disable_adapter():
            assert torch.equal(_logits(ml, adapter_names=["r4", "r16rs"]), base)
            raise RuntimeError("boom")
    assert not torch.equal(_logits(ml), base)  # restored after the exception
    ml.disable_adapters()
    assert torch.equal(_logits(ml), base)
    ml.enable_adapters()
    assert not torch.equal(_logits(ml), base)


def test_peft_config_and_status(ml, engine_adapters):
    cfg = ml.peft_config["r16rs"]
    assert isinstance(cfg, LoraConfig) and cfg.r == 16 and cfg.use_rslora
    st = ml.get_model_status()
    assert st["loaded_adapters"] == {"r4": {"slot": 1, "rank": 4}, "r16rs": {"slot": 2, "rank": 16}}
    assert st["free_slots"] == 1 and st["num_slots"] == 4 and st["num_lora_layers"] == 14
    assert st["pool_bytes"] == (ml.pool.numel() + 14 * 4) * 4


def test_batch_shape_errors(ml):
    with pytest.raises(BatchShapeError, match="adapter_names has 1 entries for a batch of 2"):
        _logits(ml, adapter_names=["r4"])
    with pytest.raises(BatchShapeError, match="beam search"):
        with torch.no_grad():
            ml.generate(input_ids=IDS, adapter_names=["r4", "r16rs"], num_beams=2, max_new_tokens=2,
                        do_sample=False, pad_token_id=0)


def test_context_is_cleared_after_calls_and_errors(ml):
    _logits(ml, adapter_names=["r4", "r16rs"])
    assert ml._ctx.slots is None and ml._ctx.empty
    with pytest.raises(BatchShapeError):
        _logits(ml, adapter_names=["r4"])
    assert ml._ctx.slots is None


@pytest.mark.parametrize("kind", ["multilora", "peft"])
def test_engine_state_semantics(kind, tiny_model_dir, tokenizer, engine_adapters):
    """What serving relies on (the `Engine` protocol): load, per-row adapters, delete, status."""
    eng = make_engine(kind, load_base(tiny_model_dir), eos_token_ids=[tokenizer.eos_token_id],
                      pad_token_id=tokenizer.pad_token_id, settings=EngineSettings(num_slots=4, max_rank=64))
    assert eng.kind == kind and eng.active_adapter is None and dict(eng.peft_config) == {}
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_new_tokens=6)
    base = eng.generate([GenerationRow(prompt, None, params)])[0]  # no adapter loaded yet
    info = eng.load_adapter(str(engine_adapters["r64"]), "r64")
    assert info.name == "r64" and info.nbytes > 0 and info.load_ms > 0
    assert eng.active_adapter is None
    eng.load_adapter(str(engine_adapters["r4"]), "r4")
    tuned = eng.generate([GenerationRow(prompt, "r64", params)])[0]
    assert tuned != base and eng.active_adapter is None  # rows name their adapter; nothing becomes active
    assert eng.generate([GenerationRow(prompt, None, params)])[0] == base
    eng.delete_adapter("r64")
    assert eng.active_adapter is None
    assert set(eng.peft_config) == {"r4"}
    assert eng.get_model_status()["engine"] == kind
    eng.delete_adapter("r4")  # the last one
    assert eng.generate([GenerationRow(prompt, None, params)])[0] == base
    eng.load_adapter(str(engine_adapters["r64"]), "r64")  # reload after emptying
    assert eng.generate([GenerationRow(prompt, "r64", params)])[0] == tuned


def test_lora_backend_comes_from_settings_not_the_environment(tiny_model_dir, monkeypatch):
    """The backend is fixed when the model is built (EngineSettings.lora_backend / triton_pdl); the
    old LORAPLEX_LORA_BACKEND variable is the config loader's business and the engine never reads it."""
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "torch")
    monkeypatch.setenv("LORAPLEX_TRITON_PDL", "0")
    m = MultiLoraModel(load_base(tiny_model_dir), EngineSettings(num_slots=2, max_rank=8, lora_backend="triton"))
    assert m.lora_backend.mode == "triton" and m.lora_backend.pdl is True
    off = MultiLoraModel(load_base(tiny_model_dir), EngineSettings(num_slots=2, max_rank=8, lora_backend="torch",
                                                                   triton_pdl=False))
    assert off.lora_backend.mode == "torch" and off.lora_backend.kernels is None and not off.lora_backend.pdl
    m.set_lora_backend("torch")
    assert m.lora_backend.mode == "torch" and not m.lora_backend.usable
    with pytest.raises(ValueError, match="unknown lora_backend"):
        EngineSettings(lora_backend="cuda")


def test_engine_protocol_is_what_serving_uses():
    """`Engine` carries the members handler/service.py and handler/residency.py call, nothing more."""
    from handler.engine.api import Engine

    members = {n for n in vars(Engine) if not n.startswith("_")} | set(Engine.__annotations__)
    assert members == {"kind", "load_adapter", "delete_adapter", "active_adapter", "peft_config",
                       "get_model_status", "generate", "stepper", "embed"}
