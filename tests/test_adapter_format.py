"""One table of adapter configs drives both sides: onboarding (`tenant_registry.validate`) and the
engines' loader (`handler.engine`, both kinds) must accept and refuse exactly the same adapters,
a refusal with the same code, file and reason (both chain the shared `AdapterRefused`). For every
accepted exotic config (rank_pattern, alpha_pattern, rslora, regex targets, layers_to_transform,
exclude_modules) the slot-pool engine's logits must match PEFT's own loading of the directory.

Also here: the worker loads the very bytes the store checked (a file swapped after the read is
not what gets loaded)."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from handler.engine import EngineError, EngineSettings, make_engine
from handler.engine.multilora import MultiLoraModel
from loraplex_common.adapter_format import DEFAULT_TARGET_MODULES, AdapterRefused
from loraplex_testing.models import ALL_TARGETS, make_lora_with_config, make_random_lora
from tenant_registry.errors import AdapterInvalid
from tenant_registry.validate import BaseModelSpec, validate_adapter

MAX_RANK = 16
W, C = "adapter_model.safetensors", "adapter_config.json"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


# ------------------------------------------------------------------------------ builders
def peft(**kw) -> Callable[[Path, Path], None]:
    """An adapter saved by PEFT itself with these LoraConfig fields."""
    def build(base: Path, out: Path) -> None:
        make_lora_with_config(base, out, seed=7, **kw)
    return build


def edited(config: dict | None = None, tensors: Callable[[dict], None] | None = None,
           raw: Callable[[bytes], bytes] | None = None, config_text: str | None = None,
           **kw) -> Callable[[Path, Path], None]:
    """A plain r=4 PEFT adapter (all seven targets, or `kw`) with one thing changed by hand."""
    def build(base: Path, out: Path) -> None:
        make_lora_with_config(base, out, seed=8, **{"r": 4, "lora_alpha": 8, "target_modules": list(ALL_TARGETS), **kw})
        if config:
            cfg = json.loads((out / C).read_text())
            cfg.update(config)
            (out / C).write_text(json.dumps(cfg))
        if config_text is not None:
            (out / C).write_text(config_text)
        if tensors:
            t = load_file(str(out / W))
            tensors(t)
            save_file(t, str(out / W))
        if raw:
            (out / W).write_bytes(raw((out / W).read_bytes()))
    return build


def _drop_b(t):
    del t[f"{Q0}.lora_B.weight"]


def _lora_c(t):
    t[f"{Q0}.lora_C.weight"] = np.zeros((2, 2), np.float32)


def _int_a(t):
    t[f"{Q0}.lora_A.weight"] = np.zeros(t[f"{Q0}.lora_A.weight"].shape, np.int32)


def _unprefixed(t):
    t["model.layers.0.self_attn.q_proj.lora_A.weight"] = t.pop(f"{Q0}.lora_A.weight")


def _huge_header(b: bytes) -> bytes:
    return struct.pack("<Q", 2**40) + b[8:]


# id -> (builder, None = accepted | the refusal code both sides must give)
CASES: dict[str, tuple[Callable[[Path, Path], None], str | None]] = {
    # accepted, and computed as PEFT computes them
    "plain": (peft(r=4, lora_alpha=8, target_modules=list(ALL_TARGETS)), None),
    "rslora": (peft(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]), None),
    "rank_alpha_pattern": (peft(r=8, lora_alpha=16, target_modules=list(ALL_TARGETS),
                                rank_pattern={"q_proj": 4, "down_proj": 12},
                                alpha_pattern={"v_proj": 64, "layers.1.mlp.up_proj": 3}), None),
    "rslora_with_patterns": (peft(r=6, lora_alpha=12, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj"],
                                  rank_pattern={"layers.0.self_attn.k_proj": 2}, alpha_pattern={"o_proj": 5}), None),
    "regex_targets": (peft(r=4, lora_alpha=8, target_modules=r".*\.self_attn\.(q|v)_proj"), None),
    "layers_to_transform": (peft(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
                            None),
    "exclude_modules": (peft(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                             exclude_modules=["layers.0.self_attn.q_proj"]), None),
    # refused by both, with the same message
    "dora": (peft(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True), "dora"),
    "lora_bias": (peft(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True), "unsupported_option"),
    "modules_to_save": (peft(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        "unsupported_option"),
    "lm_head_target": (peft(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]), "target_not_allowed"),
    "embedding_target": (peft(r=4, lora_alpha=8, target_modules=["embed_tokens"]), "unsupported_option"),
    "bias_all": (edited({"bias": "all"}), "bias"),
    "ia3": (edited({"peft_type": "IA3"}), "not_lora"),
    "fan_in_fan_out": (edited({"fan_in_fan_out": True}), "unsupported_option"),
    "pissa_init": (edited({"init_lora_weights": "pissa"}), "unsupported_option"),
    "unknown_option_set": (edited({"some_future_variant": {"on": True}}), "unsupported_option"),
    "alpha_not_a_number": (edited({"lora_alpha": "8"}), "bad_config"),
    "r_zero": (edited({"r": 0}), "bad_rank"),
    "rank_pattern_over_max": (edited({"rank_pattern": {"q_proj": 32}}), "rank_too_large"),
    "r_over_max": (edited({"r": 32}), "rank_too_large"),
    "r_disagrees_with_tensors": (edited({"r": 8}), "shape_mismatch"),
    "rank_pattern_disagrees": (edited({"rank_pattern": {"v_proj": 2}}), "shape_mismatch"),
    "layers_to_transform_excludes_tensors": (edited({"layers_to_transform": [1]}), "config_mismatch"),
    "target_not_in_base": (edited({"target_modules": [*ALL_TARGETS, "cross_attn"]}), "unknown_module"),
    "regex_target_matches_nothing": (edited({"target_modules": r".*\.cross_attn"}), "config_mismatch"),
    # a tenant's regex runs in the validator and the worker: none that can backtrack exponentially
    "regex_target_nested_repetition": (edited({"target_modules": r"(.*)*\.q_proj"}), "bad_target_modules"),
    "rank_pattern_nested_repetition": (edited({"rank_pattern": {r"(\w+\.)+q_proj": 4}}), "bad_config"),
    "missing_b": (edited(tensors=_drop_b), "missing_tensor"),
    "missing_module": (edited(tensors=lambda t: [t.pop(k) for k in list(t) if ".layers.1.mlp.up_proj." in k]),
                       "missing_tensor"),
    "unexpected_tensor": (edited(tensors=_lora_c), "unexpected_tensor"),
    "unprefixed_key": (edited(tensors=_unprefixed), "unexpected_tensor"),
    "int_dtype": (edited(tensors=_int_a), "bad_dtype"),
    "trailing_bytes": (edited(raw=lambda b: b + b"junk"), "corrupt_safetensors"),
    "header_too_long": (edited(raw=_huge_header), "corrupt_safetensors"),
    "config_not_json": (edited(config_text="{not json"), "bad_config"),
    "config_not_object": (edited(config_text="[1, 2]"), "bad_config"),
}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("format-cases")
    out = {}
    for name, (build, _) in CASES.items():
        build(tiny_model_dir, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def spec(tiny_model_dir) -> BaseModelSpec:
    return BaseModelSpec.from_model_dir(tiny_model_dir)


SETTINGS = EngineSettings(num_slots=3, max_rank=MAX_RANK, target_modules=DEFAULT_TARGET_MODULES)


@pytest.fixture(scope="module")
def slot_pool(tiny_model_dir) -> MultiLoraModel:
    return MultiLoraModel(_load_base(tiny_model_dir), SETTINGS)


@pytest.fixture(scope="module")
def peft_engine(tiny_model_dir, tokenizer_ids):
    return make_engine("peft", _load_base(tiny_model_dir), SETTINGS, eos_token_ids=[0], pad_token_id=0)


@pytest.fixture(scope="module")
def tokenizer_ids(tiny_model_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return torch.tensor([tok("the quick brown fox jumps over the lazy dog. hello world")["input_ids"]])


def _onboarding(path: Path, spec: BaseModelSpec):
    try:
        return validate_adapter(path, spec, max_rank=MAX_RANK, max_bytes=10**7, allowed_targets=DEFAULT_TARGET_MODULES)
    except AdapterInvalid as e:
        return e


def _engine_load(load: Callable[[Path, str], object], delete: Callable[[str], None], path: Path):
    try:
        load(path, "case")
    except EngineError as e:
        return e
    delete("case")
    return None


def _refusal(err: Exception) -> tuple[str, str | None, str]:
    cause = err.__cause__
    assert isinstance(cause, AdapterRefused), f"{type(err).__name__} not chained from AdapterRefused: {err}"
    return cause.code, cause.file, cause.reason


# ------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("case", list(CASES))
def test_onboarding_and_engines_agree(case, adapters, spec, slot_pool, peft_engine):
    expected = CASES[case][1]
    path = adapters[case]
    onboard = _onboarding(path, spec)
    pool_before = slot_pool.pool.clone()
    engines = {"multilora": _engine_load(slot_pool.load_adapter, slot_pool.delete_adapter, path),
               "peft": _engine_load(peft_engine.load_adapter, peft_engine.delete_adapter, path)}
    if expected is None:
        assert not isinstance(onboard, Exception), f"onboarding refused: {onboard}"
        for kind, err in engines.items():
            assert err is None, f"{kind} engine refused what onboarding accepts: {err}"
        return
    assert isinstance(onboard, AdapterInvalid), f"onboarding accepted a {expected} adapter"
    assert onboard.code == expected, str(onboard)
    for kind, err in engines.items():
        assert err is not None, f"{kind} engine accepted what onboarding refuses ({onboard})"
        assert _refusal(err) == _refusal(onboard), (kind, str(err), str(onboard))
        assert f"{onboard.file}: {onboard.reason}" in str(err)
    assert torch.equal(slot_pool.pool, pool_before)  # a refused load leaves no trace


ACCEPTED = [name for name, (_, code) in CASES.items() if code is None]


@pytest.mark.parametrize("case", ACCEPTED)
def test_accepted_configs_compute_what_peft_computes(case, adapters, tiny_model_dir, slot_pool, tokenizer_ids):
    from peft import PeftModel

    ref_model = PeftModel.from_pretrained(_load_base(tiny_model_dir), str(adapters[case])).eval()
    slot_pool.load_adapter(adapters[case], "case")
    try:
        with torch.no_grad():
            ref = ref_model(input_ids=tokenizer_ids).logits
            ours = slot_pool(input_ids=tokenizer_ids, adapter_names=["case"]).logits
            base = slot_pool(input_ids=tokenizer_ids, adapter_names=["__base__"]).logits
    finally:
        slot_pool.delete_adapter("case")
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err <= 1e-5, err
    assert float((base - ref).abs().max()) > 1e-3  # the adapter really changes the output


def test_the_table_covers_the_exotic_options_peft_writes(adapters):
    """The accepted rows really carry the options they are named after (PEFT wrote them)."""
    cfg = {n: json.loads((adapters[n] / C).read_text()) for n in ACCEPTED}
    assert cfg["rank_alpha_pattern"]["rank_pattern"] and cfg["rank_alpha_pattern"]["alpha_pattern"]
    assert cfg["rslora_with_patterns"]["use_rslora"] and cfg["rslora_with_patterns"]["rank_pattern"]
    assert isinstance(cfg["regex_targets"]["target_modules"], str)
    assert cfg["layers_to_transform"]["layers_to_transform"] == [1]
    assert cfg["exclude_modules"]["exclude_modules"]


# ------------------------------------------------------------------------------ read once
def test_worker_loads_the_bytes_the_store_checked(tiny_model_dir, spec, tmp_path, slot_pool, tokenizer_ids):
    """`AdapterStore.read` hashes exactly the bytes it returns; the engine loads those, so a file
    swapped in after the read is not what gets loaded (and the next read refuses it)."""
    from tenant_registry.schema import TenantRecord
    from tenant_registry.store import AdapterStore

    good = make_random_lora(tiny_model_dir, tmp_path / "good", r=4, alpha=8, seed=41)
    other = make_random_lora(tiny_model_dir, tmp_path / "other", r=4, alpha=8, seed=42)
    store = AdapterStore(tmp_path / "store")
    m = validate_adapter(good, spec, max_rank=MAX_RANK, max_bytes=10**7)
    rel = store.install("acme", 1, good, m)
    rec = TenantRecord(tenant_id="acme", adapter_id="acme@v1", version=1, path=rel, sha256=m.sha256, rank=m.rank,
                       alpha=m.alpha, use_rslora=m.use_rslora, target_modules=m.target_modules,
                       base_model=m.base_model, status="enabled", created_at=0.0, updated_at=0.0, nbytes=m.nbytes)
    verified = store.read(rec)
    shutil.copy(other / W, store.path_for(rec) / W)  # same shapes, other values, after the check
    slot_pool.load_adapter(verified, "from_bytes")
    slot_pool.load_adapter(good, "good")
    slot_pool_other = slot_pool.pool[slot_pool.slot_of("from_bytes")].clone()
    try:
        assert torch.equal(slot_pool_other, slot_pool.pool[slot_pool.slot_of("good")])
    finally:
        slot_pool.delete_adapter("from_bytes")
        slot_pool.delete_adapter("good")
    with pytest.raises(AdapterInvalid) as ei:
        store.read(rec)
    assert ei.value.code == "sha256_mismatch"
