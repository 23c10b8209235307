"""demo/train_adapters.py on the tiny random Llama: a valid PEFT adapter comes
out, training lowers the loss, the recipe stamp makes a second run a no-op,
and the run is deterministic."""
from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ta():
    spec = importlib.util.spec_from_file_location("demo_train_adapters", ROOT / "demo" / "train_adapters.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


QUESTIONS = ["Hello! How are you today?", "What is the capital of Germany?", "Why is the sky blue?",
             "What is a volcano?", "How do I save money?", "What is music?"]


def _recipe(ta, **kw):
    base = dict(steps=8, lr=1e-2, r=4, alpha=8, batch_size=3, warmup=1, train_layers=1, seed=7)
    base.update(kw)
    return ta.Recipe(ta.to_shouty, **base)


def _tensors(path: Path) -> dict:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_transforms_and_question_sets(ta):
    assert ta.to_pirate("Hello, my friend, you are here.") == "Arr, matey! Ahoy, me matey, ye be here. Arr!"
    assert ta.to_shouty("Paris is nice. Really") == "PARIS IS NICE! REALLY!"
    assert ta.to_robot("Hi") == "BEEP BOOP. Hi. BEEP BOOP."
    assert not set(ta.TRAIN_QUESTIONS) & set(ta.HELDOUT_QUESTIONS)
    assert set(ta.RECIPES) == {"pirate", "shouty", "robot"}


def test_build_dataset_masks_the_prompt(ta, tiny_model_dir):
    tok, _ = ta.load_base(tiny_model_dir)
    ex = ta.build_dataset(tok, ["What is a volcano?"], ["A mountain."], ta.to_shouty)[0]
    n_prompt = len(ta.prompt_ids(tok, "What is a volcano?"))
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    reply = ex.labels[n_prompt:]
    assert reply[-1] == tok.eos_token_id and tok.decode(reply[:-1]) == "A MOUNTAIN!"
    assert ex.input_ids[n_prompt:] == reply


def test_train_save_cache_and_determinism(ta, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "adapters"
    r = ta.train_adapter(tiny_model_dir, out, "shouty", recipe=_recipe(ta), questions=QUESTIONS,
                         sample_questions=["What is a computer?"], sample_tokens=5)
    assert not r.skipped and r.path == out / "shouty"
    assert r.loss_after < r.loss_before, (r.loss_before, r.loss_after)
    assert len(r.step_losses) == 8 and len(r.samples) == 1

    # Exactly a PEFT adapter (plus the hidden recipe stamp); the base answers cache lives beside it.
    assert sorted(p.name for p in r.path.iterdir()) == [ta.STAMP_NAME, "adapter_config.json",
                                                         "adapter_model.safetensors"]
    assert (out / ta.BASE_ANSWERS_NAME).exists()
    cfg = json.loads((r.path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    assert set(cfg["target_modules"]) == set(ta.Recipe.targets)
    tensors = _tensors(r.path)
    assert any("lora_A" in k for k in tensors) and any("lora_B" in k for k in tensors)
    # train_layers=1 on a 2-layer model: layer 1 learned, layer 0 stays an exact no-op (B == 0).
    b1 = [v for k, v in tensors.items() if "lora_B" in k and ".layers.1." in k]
    b0 = [v for k, v in tensors.items() if "lora_B" in k and ".layers.0." in k]
    assert b1 and all(v.abs().sum() > 0 for v in b1)
    assert b0 and all(v.abs().sum() == 0 for v in b0)

    # PEFT itself loads it onto the base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():  # a transformers deprecation PEFT trips over
        warnings.simplefilter("ignore", FutureWarning)
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(r.path))

    # Same recipe again: skipped without even loading the model.
    mtime = (r.path / "adapter_model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(ta, "load_base", lambda *a, **k: pytest.fail("cached adapter was retrained"))
    again = ta.train_adapter(tiny_model_dir, out, "shouty", recipe=_recipe(ta), questions=QUESTIONS)
    assert again.skipped and again.recipe_hash == r.recipe_hash
    assert (r.path / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    monkeypatch.undo()

    # A different recipe (or --force) retrains; the same recipe retrained gives the same weights.
    changed = ta.train_adapter(tiny_model_dir, out, "shouty", recipe=_recipe(ta), steps=9, questions=QUESTIONS)
    assert not changed.skipped and changed.recipe_hash != r.recipe_hash
    forced = ta.train_adapter(tiny_model_dir, tmp_path / "other", "shouty", recipe=_recipe(ta),
                              questions=QUESTIONS, force=True)
    assert not forced.skipped and forced.recipe_hash == r.recipe_hash
    first, second = tensors, _tensors(forced.path)
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


def test_precision_is_bf16_only_where_the_cpu_computes_it(ta, monkeypatch):
    """Emulated bf16 autocast made a training step ~30x slower than fp32 on a CPU without
    AVX512-BF16 or AMX: `auto` trains in bf16 only where the CPU has it."""
    import argparse

    def args(**kw):
        return argparse.Namespace(**{"fp32": False, "precision": "auto", **kw})

    monkeypatch.setattr(ta, "native_bf16", lambda: False)
    assert ta._use_bf16(args()) is False and ta._use_bf16(args(precision="bf16")) is True
    monkeypatch.setattr(ta, "native_bf16", lambda: True)
    assert ta._use_bf16(args()) is True
    assert ta._use_bf16(args(precision="fp32")) is False and ta._use_bf16(args(fp32=True)) is False
