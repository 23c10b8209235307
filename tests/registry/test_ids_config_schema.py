"""Tenant ids, the config object and the record schema: pure code, no Redis."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex_common.config import DEFAULT_TARGET_MODULES, LoraplexConfig
from loraplex_common.config import ConfigError, find_model_config
from tenant_registry.errors import InvalidTenantId
from tenant_registry.ids import adapter_id, is_valid_tenant_id, parse_adapter_id, validate_tenant_id
from tenant_registry.schema import RecordError, TenantRecord


@pytest.mark.parametrize("good", ["a", "acme", "acme-corp_2", "0", "a" * 63, "9lives"])
def test_valid_tenant_ids(good):
    assert validate_tenant_id(good) == good


@pytest.mark.parametrize("bad", [
    "", "../etc", "a/../b", "a/b", "/abs", "a\x00b", "acme\n", "x" * 10_000, "a" * 64, "Acme", "ACME",
    "-lead", "_lead", "acme.corp", "acme corp", "аcme",  # Cyrillic 'а'
    "ａcme",  # full-width 'a'
    "acme\u200b", "ß", None, 42, b"acme", ["acme"],
])
def test_invalid_tenant_ids(bad):
    assert not is_valid_tenant_id(bad)
    with pytest.raises(InvalidTenantId) as ei:
        validate_tenant_id(bad)
    assert len(str(ei.value)) < 200  # a 10 KB id is never echoed back whole


def test_adapter_ids():
    assert adapter_id("acme", 3) == "acme@v3"
    assert parse_adapter_id("acme@v3") == ("acme", 3)
    for bad in ["acme", "acme@3", "acme@v0", "Acme@v1", "../x@v1", "acme@v1\n", None]:
        with pytest.raises(InvalidTenantId):
            parse_adapter_id(bad)


# ---------------------------------------------------------------------------- config
def test_config_defaults():
    c = LoraplexConfig.load(env={})
    assert c.redis_url == "redis://127.0.0.1:6379/0" and c.redis_prefix == "loraplex"
    assert c.max_rank == 64 and c.max_adapter_bytes == 268435456
    assert c.num_slots == 10 and c.resident_adapters == 8  # slot 0 = base, one spare
    assert c.lora_backend == "auto" and c.triton_pdl is True
    assert c.unknown_tenant_policy == "base" and c.load_failure_policy == "base" and c.require_tenant is False
    assert c.target_modules == DEFAULT_TARGET_MODULES and c.engine == "multilora" and c.decode == "auto"
    assert c.management_url == "http://127.0.0.1:8081" and c.model_name == "loraplex"
    assert c.require_tenant_key is False and c.registry_stale_s == 300.0 and c.registry_cache_s == 30.0


def test_config_known_keys():
    """The full set of keys (README's config table documents each); a new key must be added here."""
    assert set(LoraplexConfig().to_dict()) == {
        "redis_url", "redis_prefix", "adapter_store", "base_model_dir", "base_model_name", "max_rank",
        "max_adapter_bytes", "num_slots", "idle_ttl_s", "unknown_tenant_policy", "unknown_task_policy",
        "load_failure_policy", "require_tenant", "require_tenant_key", "max_new_tokens_cap", "max_prompt_tokens", "device", "dtype",
        "engine", "decode", "decode_graph_buckets", "lora_backend", "triton_pdl", "cpu_gather_workspace_mb",
        "target_modules", "negative_cache_s", "registry_cache_s", "registry_stale_s", "management_url", "model_name",
        "model_store", "management_key_file", "adapter_store_endpoint", "host_tier_mb", "max_pinned_adapters",
        "prefetch_top_n", "prefetch_tenants", "metrics_max_adapters", "epp_metrics_address",
        "scheduler", "kv_rows", "kv_max_len", "prefill_chunk", "prefill_wait_steps", "prefill_graphs", "step_overlap",
        "step_mixed", "mixed_prefill_tokens",
        "graph_batch_sizes", "admission_max_wait_s", "drain_preempt_tokens",
        "max_waiting", "retry_after_s", "task_router", "max_fanout_rows",
        "tenant_max_running", "request_timeout_s",
        "onboarding_address", "quota_max_tasks", "quota_max_versions", "quota_max_bytes"}
    with pytest.raises(ConfigError) as ei:
        LoraplexConfig.from_mapping({"require_tenant_keys": True})
    assert ei.value.key == "require_tenant_keys" and "require_tenant_key" in str(ei.value)


def test_config_tenant_key_and_staleness():
    c = LoraplexConfig.load(handler_section={"require_tenant_key": True, "registry_stale_s": 12},
                            env={"LORAPLEX_REGISTRY_STALE_S": "45.5"})
    assert c.require_tenant_key is True and c.registry_stale_s == 45.5
    c = LoraplexConfig.load(env={"LORAPLEX_REQUIRE_TENANT_KEY": "off", "LORAPLEX_REGISTRY_STALE_S": "0"})
    assert c.require_tenant_key is False and c.registry_stale_s == 0.0


def test_config_yaml_env_override_precedence(tmp_path):
    y = tmp_path / "model-config.yaml"
    y.write_text("minWorkers: 1\nbatchSize: 4\nhandler:\n  max_rank: 32\n  require_tenant: true\n"
                 "  target_modules: [q_proj, v_proj]\n  idle_ttl_s: 5\n  redis_prefix: fromyaml\n")
    c = LoraplexConfig.load(y, env={"LORAPLEX_MAX_RANK": "8", "LORAPLEX_ENGINE": "PEFT", "OTHER": "x"},
                            overrides={"redis_prefix": "fromflag", "adapter_store": None})
    assert c.max_rank == 8 and c.engine == "peft" and c.require_tenant is True
    assert c.target_modules == ("q_proj", "v_proj") and c.idle_ttl_s == 5.0
    assert c.redis_prefix == "fromflag" and c.adapter_store == str(tmp_path.resolve() / "var" / "adapters")
    # The parsed section a TorchServe worker gets sits below env.
    c2 = LoraplexConfig.load(handler_section={"max_rank": 4, "device": "cpu"}, env={"LORAPLEX_MAX_RANK": "12"})
    assert c2.max_rank == 12 and c2.device == "cpu"
    c3 = LoraplexConfig.load(env={"LORAPLEX_TARGET_MODULES": "q_proj, k_proj", "LORAPLEX_REQUIRE_TENANT": "yes"})
    assert c3.target_modules == ("q_proj", "k_proj") and c3.require_tenant is True


@pytest.mark.parametrize("key,value", [
    ("max_rank", "lots"), ("max_rank", 0), ("max_rank", True), ("idle_ttl_s", "nan"), ("idle_ttl_s", -1),
    ("unknown_tenant_policy", "allow"), ("unknown_task_policy", "base"), ("load_failure_policy", 1), ("require_tenant", "maybe"),
    ("device", "tpu"), ("dtype", "int8"), ("engine", "vllm"), ("target_modules", []),
    ("target_modules", "q_proj;rm -rf"), ("redis_url", "http://x"), ("redis_prefix", "a b"),
    ("management_url", "ftp://x"), ("model_name", ""), ("num_slots", 1.5), ("num_slots", 2),
    ("num_slot", 3),  # typo: unknown key
    ("lora_backend", "cuda"), ("triton_pdl", "maybe"),
    ("require_tenant_key", "sometimes"), ("require_tenant_key", 1), ("registry_stale_s", -5),
    ("registry_stale_s", "inf"), ("registry_stale_s", False),
])
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError) as ei:
        LoraplexConfig.from_mapping({key: value})
    assert ei.value.key == key and key in str(ei.value)


def test_config_env_error_names_key():
    with pytest.raises(ConfigError) as ei:
        LoraplexConfig.load(env={"LORAPLEX_MAX_NEW_TOKENS_CAP": "-3"})
    assert ei.value.key == "max_new_tokens_cap"


def test_config_unknown_loraplex_variables_are_errors():
    with pytest.raises(ConfigError) as ei:
        LoraplexConfig.load(env={"LORAPLEX_MAX_RANKS": "8"})
    assert ei.value.key == "LORAPLEX_MAX_RANKS" and "did you mean LORAPLEX_MAX_RANK?" in str(ei.value)
    with pytest.raises(ConfigError, match="LORAPLEX_LORA_BAKEND"):
        LoraplexConfig.load(env={"LORAPLEX_LORA_BAKEND": "torch"})
    # The non-setting variables (NON_SETTING_ENV) and other prefixes are not settings and not errors.
    c = LoraplexConfig.load(env={"LORAPLEX_TS_TOKEN": "t", "LORAPLEX_MODEL_CONFIG": "x.yaml", "LORAPLEX_CACHE": "/c",
                                 "LORAPLEXX": "1", "LORAPLEX_LORA_BACKEND": "TORCH", "LORAPLEX_TRITON_PDL": "0"})
    assert c.lora_backend == "torch" and c.triton_pdl is False
    with pytest.raises(ConfigError, match=r"did you mean num_slots\?"):
        LoraplexConfig.from_mapping({"num_slot": 4})


def test_config_slots_one_capacity():
    c = LoraplexConfig.from_mapping({"num_slots": 3})
    assert c.resident_adapters == 1  # slot 0 = base, one spare, one resident
    with pytest.raises(ConfigError, match="base model"):
        LoraplexConfig.from_mapping({"num_slots": 2})


def test_config_relative_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    y = proj / "model-config.yaml"
    y.write_text("handler:\n  adapter_store: var/adapters\n  base_model_dir: models/base\n"
                 "  model_store: /abs/store\n")
    monkeypatch.chdir(tmp_path)
    c = LoraplexConfig.load("proj/model-config.yaml", env={})
    assert c.adapter_store == str(proj.resolve() / "var" / "adapters")
    assert c.base_model_dir == str(proj.resolve() / "models" / "base") and c.model_store == "/abs/store"
    assert c.management_key_file == str(proj.resolve() / "var" / "torchserve" / "key_file.json")  # a default
    # env and flags are where they were typed: the current directory.
    c = LoraplexConfig.load(y, env={"LORAPLEX_ADAPTER_STORE": "mine"}, overrides={"base_model_dir": "flag"})
    assert c.adapter_store == "mine" and c.base_model_dir == "flag"
    # An empty base_model_dir stays empty (= the TorchServe model dir); no file: nothing is resolved.
    bare = LoraplexConfig.load(env={})
    assert bare.base_model_dir == "" and bare.adapter_store == "var/adapters"


def test_find_model_config(tmp_path):
    assert find_model_config("x.yaml", env={}, cwd=tmp_path) == Path("x.yaml")
    assert find_model_config(None, env={"LORAPLEX_MODEL_CONFIG": "/m.yaml"}, cwd=tmp_path) == Path("/m.yaml")
    assert find_model_config(None, env={}, cwd=tmp_path) is None
    (tmp_path / "model-config.yaml").write_text("handler: {}\n")
    assert find_model_config(None, env={}, cwd=tmp_path) == tmp_path / "model-config.yaml"


def test_config_bad_yaml(tmp_path):
    y = tmp_path / "m.yaml"
    y.write_text("handler: [1, 2]\n")
    with pytest.raises(ConfigError, match="handler"):
        LoraplexConfig.load(y, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        LoraplexConfig.load(tmp_path / "missing.yaml", env={})


# ---------------------------------------------------------------------------- schema
def _record(**kw) -> TenantRecord:
    base = dict(tenant_id="acme", adapter_id="acme@v2", version=2, path="acme/v2", sha256="ab" * 32, rank=8,
                alpha=16, use_rslora=False, target_modules=["v_proj", "q_proj"], base_model="tiny",
                status="enabled", created_at=1.5, updated_at=2.5, nbytes=1234)
    base.update(kw)
    return TenantRecord(**base)


def test_record_round_trip():
    r = _record()
    assert r.target_modules == ("q_proj", "v_proj") and r.alpha == 16.0
    assert TenantRecord.from_json(r.to_json()) == r
    assert json.loads(r.to_json())["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("sha256"),
    lambda d: d.update(extra=1),
    lambda d: d.update(version="2"),
    lambda d: d.update(version=True),
    lambda d: d.update(adapter_id="other@v2"),
    lambda d: d.update(path="../other/v1"),
    lambda d: d.update(path="/etc"),
    lambda d: d.update(sha256="XYZ"),
    lambda d: d.update(status="paused"),
    lambda d: d.update(tenant_id="../x"),
    lambda d: d.update(target_modules="q_proj"),
    lambda d: d.update(use_rslora="no"),
    lambda d: d.update(nbytes=-1),
    lambda d: d.update(created_at=float("nan")) if False else d.update(created_at="yesterday"),
])
def test_record_strictness(mutate):
    d = json.loads(_record().to_json())
    mutate(d)
    with pytest.raises(RecordError):
        TenantRecord.from_json(json.dumps(d))


def test_record_json_garbage():
    for bad in ["", "[]", "{", b"\xff\xfe"]:
        with pytest.raises(RecordError):
            TenantRecord.from_json(bad)


def test_a_store_uri_in_a_model_config_is_kept_as_given(tmp_path):
    """Relative paths in a model-config file resolve against its directory; a URI is not a path."""
    y = tmp_path / "model-config.yaml"
    y.write_text("handler:\n  adapter_store: s3://bucket/prefix\n")
    assert LoraplexConfig.load(y, env={}).adapter_store == "s3://bucket/prefix"
