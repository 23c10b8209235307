"""End to end on an `s3://` adapter store: a real TorchServe whose worker reads adapters from a
private S3-compatible server (moto's; `loraplex_testing.services.S3Server` says why it is a fair
stand-in), tenants onboarded into the bucket with the real `tenantctl`, served (text = PEFT's),
evicted (one resident adapter) and reloaded from the bucket; a hostile adapter refused with nothing
written; an object altered in the bucket refused at reload by the sha256 check. The host-memory
tier is off here so that every reload reads the store."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from loraplex_testing.archive import build_archive, with_batching
from loraplex_testing.services import S3Server, TorchServe

pytestmark = pytest.mark.e2e


def _load(name: str, path: Path):
    """A module of tests/ by its file, under a name of its own: `from conftest import` picks whichever
    conftest was imported last, and tests/ is no package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_HERE = Path(__file__).resolve().parent
E2EStack = _load("loraplex_e2e_conftest", _HERE / "conftest.py").E2EStack  # reused, not edited
hostile = _load("loraplex_registry_hostile", _HERE.parent / "registry" / "hostile.py")
ROOT = _HERE.parents[1]

W = "adapter_model.safetensors"


@dataclass
class S3Stack(E2EStack):
    s3: S3Server | None = None
    client_env: dict[str, str] = field(default_factory=dict)

    def tenantctl(self, *args: str) -> subprocess.CompletedProcess:
        """E2EStack.tenantctl with the S3 endpoint and credentials in the environment."""
        exe = Path(sys.executable).parent / "tenantctl"
        base = [str(exe), "--json", "--model-config", str(self.tmp / "model-config.yaml"), "--redis-url",
                self.redis_url, "--store", str(self.store), "--base-model-dir", str(self.model),
                "--management-url", self.ts.management_url, "--key-file", str(self.ts.workdir / "key_file.json")]
        return subprocess.run(base + list(args), capture_output=True, text=True, timeout=120,
                              env={"LORAPLEX_REDIS_PREFIX": self.prefix, "PATH": "/usr/bin:/bin", **self.client_env})

    def objects(self):
        """(every key in the store's bucket, an s3fs client on the bucket)."""
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=self.s3.url, key=self.s3.ACCESS_KEY, secret=self.s3.SECRET_KEY,
                               use_listings_cache=False, skip_instance_cache=True)
        return sorted(fs.find(str(self.store)[len("s3://"):].split("/")[0])), fs


@pytest.fixture(scope="module")
def s3_stack(tiny_model_dir, redis_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-s3")
    s3 = S3Server(tmp / "moto")
    ts = None
    try:
        s3.start()
        bucket = f"lpx-{uuid.uuid4().hex[:10]}"
        s3.make_bucket(bucket)
        store = f"s3://{bucket}/adapters"
        cfg = yaml.safe_load((ROOT / "model-config.yaml").read_text())
        cfg = with_batching(cfg, 4, 100)  # TorchServe batches only a synchronous (static) worker
        # num_slots 3: one resident adapter, so every switch of tenant evicts and reloads.
        cfg["handler"].update({"num_slots": 3, "base_model_name": "", "max_new_tokens_cap": 32, "host_tier_mb": 0,
                               "idle_ttl_s": 600, "negative_cache_s": 30})
        (tmp / "model-config.yaml").write_text(yaml.safe_dump(cfg))
        build_archive(tiny_model_dir, tmp / "model_store", config_file=tmp / "model-config.yaml")
        prefix = "e2e-s3"
        client_env = {**s3.env, "LORAPLEX_ADAPTER_STORE_ENDPOINT": s3.url}
        env = {"LORAPLEX_REDIS_URL": redis_url, "LORAPLEX_ADAPTER_STORE": store, "LORAPLEX_REDIS_PREFIX": prefix,
               **client_env}
        ts = TorchServe(tmp / "ts", tmp / "model_store", env=env)
        ts.start(timeout=240)
        yield S3Stack(ts=ts, tmp=tmp, redis_url=redis_url, store=store, model=tiny_model_dir, prefix=prefix,
                      s3=s3, client_env=client_env)
    finally:
        if ts is not None:
            ts.stop()
        s3.stop()


def _meta(stack) -> dict:
    meta = stack.ts.describe()[0]["customizedMetadata"]
    return json.loads(meta) if isinstance(meta, str) else meta


def test_s3_store_onboard_serve_evict_reload_and_refusals(s3_stack, tiny_adapters, tmp_path):
    stack, new = s3_stack, s3_stack.new_tokens
    bucket_key = stack.store[len("s3://"):]
    for name in ("a", "b"):
        done = stack.tenantctl("onboard", f"s3-{name}", str(tiny_adapters[name]))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["adapter_id"] == f"s3-{name}@v1"
    keys, fs = stack.objects()
    assert keys == sorted(f"{bucket_key}/s3-{n}/v1/{f}" for n in "ab"
                          for f in ("adapter_config.json", W))
    assert not (stack.tmp / "adapters").exists() and not (stack.ts.workdir / "var").exists()  # no local store

    prompts = {"a": "hello world", "b": "the quick brown fox"}
    want = {n: stack.expected(tiny_adapters[n], p) for n, p in prompts.items()}
    base_b = stack.expected(None, prompts["b"])
    assert len(set(want.values()) | {base_b}) == 3

    # One resident adapter: a, b, a, b loads four times and evicts three times, each load from the bucket.
    for name in ("a", "b", "a", "b"):
        r = stack.ask(f"s3-{name}", {"prompt": prompts[name], "max_new_tokens": new})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["text"], body["adapter"], body["fallback"]) == (want[name], f"s3-{name}@v1", None)
    meta = _meta(stack)
    assert [r["adapter"] for r in meta["resident"]] == ["s3-b@v1"]
    assert meta["counters"]["loads"] >= 4 and meta["counters"]["evictions_lru"] >= 3

    # The local store's hostile-adapter refusal, through tenantctl into s3: exit 4, nothing written.
    for build in (hostile.pickle_bin, hostile.wrong_shape_in):
        src = tmp_path / build.__name__
        shutil.copytree(tiny_adapters["a"], src)
        build(src, tmp_path)
        done = stack.tenantctl("onboard", "s3-evil", str(src))
        assert done.returncode == 4, done.stdout + done.stderr
    assert stack.objects()[0] == keys
    assert stack.tenantctl("show", "s3-evil").returncode == 3

    # An object altered in the bucket: the reload's sha256 check refuses it (base model, flagged).
    r = stack.ask("s3-a", {"prompt": prompts["a"], "max_new_tokens": new})  # evicts s3-b
    assert r.json()["adapter"] == "s3-a@v1"
    obj = f"{bucket_key}/s3-b/v1/{W}"
    data = bytearray(fs.cat_file(obj))
    data[-1] ^= 0xFF
    fs.pipe_file(obj, bytes(data))
    body = stack.ask("s3-b", {"prompt": prompts["b"], "max_new_tokens": new}).json()
    assert (body["adapter"], body["fallback"], body["text"]) == ("base", "adapter_load_failed: s3-b@v1", base_b)

    # A new version onboarded into the bucket is served; rollback verifies the old one in the bucket first.
    done = stack.tenantctl("onboard", "s3-a", str(tiny_adapters["c"]))
    assert done.returncode == 0, done.stderr
    body = stack.ask("s3-a", {"prompt": prompts["a"], "max_new_tokens": new}).json()
    assert (body["adapter"], body["text"]) == ("s3-a@v2", stack.expected(tiny_adapters["c"], prompts["a"]))
    assert stack.tenantctl("rollback", "s3-b").returncode != 0  # only one version: nothing to roll back to
    done = stack.tenantctl("rollback", "s3-a")
    assert done.returncode == 0, done.stderr
    body = stack.ask("s3-a", {"prompt": prompts["a"], "max_new_tokens": new}).json()
    assert (body["adapter"], body["text"]) == ("s3-a@v1", want["a"])

    # remove deletes the tenant's objects.
    assert stack.tenantctl("remove", "s3-a").returncode == 0
    assert not any("/s3-a/" in k for k in stack.objects()[0])
