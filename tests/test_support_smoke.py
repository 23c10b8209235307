"""The shared builders produce what the other tests rely on."""
import json

import redis
from safetensors import safe_open


def test_tiny_model_and_adapter_formats(tiny_model_dir, tiny_adapters):
    assert (tiny_model_dir / "model.safetensors").exists()
    cfg = json.loads((tiny_adapters["b"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    with safe_open(str(tiny_adapters["b"] / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(("q_proj" in k or "v_proj" in k) for k in keys)


def test_redis_fixture_is_real(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.set("loraplex:test", "1")
    assert r.get("loraplex:test") == b"1"
    assert "redis_version" in r.info("server")
