"""The s3:// adapter store against a real S3-compatible server (moto's, started here on a private port:
loraplex_testing.services.S3Server says why it is a fair stand-in): onboarding round trip, the reads'
sha256 / config / missing-object checks, forged record paths, and every hostile adapter of the local
store's table refused with nothing written to the bucket or Redis."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from loraplex_testing.services import S3Server
from tenant_registry.errors import AdapterInvalid, ConfigError, RegistryUnavailable
from tenant_registry.onboarding import onboard
from tenant_registry.s3_store import S3AdapterStore
from tenant_registry.store import AdapterStore, StoreError, open_store
from tenant_registry.validate import validate_adapter

from .hostile import HOSTILE
from .test_validate import EXPECT_IN_MESSAGE
from .util import keys_under

W, C = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    name = f"lpx-{uuid.uuid4().hex[:12]}"
    s3.make_bucket(name)
    return name


@pytest.fixture
def s3store(s3, bucket) -> S3AdapterStore:
    store = open_store(f"s3://{bucket}/adapters", s3.url)
    assert isinstance(store, S3AdapterStore)
    return store


def objects(store: S3AdapterStore) -> dict[str, bytes]:
    """Every object in the store's bucket (whole bucket, not only the prefix), by key."""
    bucket = store.uri[len("s3://"):].split("/")[0]
    return {k: store._fs.cat_file(k) for k in store._fs.find(bucket)}


def test_round_trip(registry, s3store, base_spec, config, tiny_adapters, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_adapters["b"], src)
    (src / "training_args.json").write_text("{}")
    rec = onboard(registry, s3store, base_spec, "acme", src, config)
    assert rec.adapter_id == "acme@v1" and rec.path == "acme/v1"
    base = s3store.uri[len("s3://"):]
    assert objects(s3store) == {f"{base}/acme/v1/{C}": (src / C).read_bytes(),
                                f"{base}/acme/v1/{W}": (src / W).read_bytes()}  # only the two files
    shutil.rmtree(src)  # workers read the store, not the source
    got = s3store.read(rec)
    assert got.name == "acme@v1" and bytes(got.weights) == (tiny_adapters["b"] / W).read_bytes()
    assert got.config == (tiny_adapters["b"] / C).read_bytes()
    assert hashlib.sha256(got.weights).hexdigest() == rec.sha256 == got.sha256
    assert s3store.verify(rec) == f"s3://{base}/acme/v1" and s3store.has(rec)
    with pytest.raises(StoreError, match="object store"):
        s3store.path_for(rec)

    rec2 = onboard(registry, s3store, base_spec, "acme", tiny_adapters["c"], config)
    assert registry.get("acme") == rec2 and s3store.tenant_versions("acme") == [1, 2]
    # One reused buffer for every read (grown to the largest), each read its own bytes.
    for r, name in ((rec, "b"), (rec2, "c"), (rec, "b")):
        assert bytes(s3store.read(r).weights) == (tiny_adapters[name] / W).read_bytes()
    assert s3store._weights_buffer.nbytes == max((tiny_adapters[n] / W).stat().st_size for n in "bc")

    m = validate_adapter(tiny_adapters["a"], base_spec, max_rank=16, max_bytes=10**7)
    with pytest.raises(StoreError, match="never overwritten"):
        s3store.install("acme", 2, tiny_adapters["a"], m)
    s3store.remove_version("acme", 1)
    assert s3store.tenant_versions("acme") == [2] and not s3store.has(rec)
    s3store.remove_tenant("acme")
    assert objects(s3store) == {}
    s3store.remove_tenant("acme")  # idempotent


def test_read_refuses_tampered_and_missing_objects(registry, s3store, base_spec, config, tiny_adapters):
    rec = onboard(registry, s3store, base_spec, "acme", tiny_adapters["a"], config)
    key = f"{s3store.uri[len('s3://'):]}/{rec.path}"
    data = bytearray(s3store._fs.cat_file(f"{key}/{W}"))
    data[-1] ^= 0xFF
    s3store._fs.pipe_file(f"{key}/{W}", bytes(data))
    with pytest.raises(AdapterInvalid) as ei:
        s3store.read(rec)
    assert ei.value.code == "sha256_mismatch" and "acme@v1" in str(ei.value)
    with pytest.raises(AdapterInvalid):
        s3store.verify(rec)

    data[-1] ^= 0xFF  # weights restored; now the config says another alpha
    s3store._fs.pipe_file(f"{key}/{W}", bytes(data))
    s3store.read(rec)
    cfg = json.loads(s3store._fs.cat_file(f"{key}/{C}"))
    s3store._fs.pipe_file(f"{key}/{C}", json.dumps({**cfg, "lora_alpha": 999}).encode())
    with pytest.raises(AdapterInvalid) as ei:
        s3store.read(rec)
    assert ei.value.code == "config_mismatch"

    s3store._fs.rm(f"{key}/{W}")
    with pytest.raises(AdapterInvalid) as ei:
        s3store.read(rec)
    assert ei.value.code == "missing_file" and ei.value.file == W and not s3store.has(rec)


def test_forged_record_paths_are_refused(registry, s3store, base_spec, config, tiny_adapters):
    rec = onboard(registry, s3store, base_spec, "acme", tiny_adapters["a"], config)
    for bad in ["../outside", "/etc", "acme/../../x", "acme/v1/..", "acme/v1/x", "acme", "other-bucket/v1",
                "Acme/v1", "acme/v1/../../../otherbucket/v1"]:
        forged = dataclasses.replace(rec)
        object.__setattr__(forged, "path", bad)
        if bad == "other-bucket/v1":  # a well-formed path of another tenant's name stays inside the prefix
            assert s3store.key_for(forged).startswith(s3store.uri[len("s3://"):] + "/")
            continue
        with pytest.raises(StoreError, match="not <tenant>/v<N>"):
            s3store.read(forged)
        assert not s3store.has(forged)


@pytest.mark.parametrize("build", HOSTILE, ids=lambda f: f.__name__)
def test_hostile_adapter_refused_and_nothing_written(build, tiny_adapters, tmp_path, base_spec, registry, s3store,
                                                      config, raw_redis, prefix, tiny_model_dir):
    src = tmp_path / "src"
    shutil.copytree(tiny_adapters["a"], src)
    outside = tmp_path / "outside"
    outside.mkdir()
    code = build(src, outside)
    cfg = config if build.__name__ != "other_base_model" else \
        type(config).from_mapping({**config.to_dict(), "base_model_name": tiny_model_dir.name})
    with pytest.raises(AdapterInvalid) as ei:
        onboard(registry, s3store, base_spec, "victim", src, cfg)
    assert ei.value.code == code, str(ei.value)
    assert EXPECT_IN_MESSAGE[code].lower() in str(ei.value).lower(), str(ei.value)
    assert keys_under(raw_redis, prefix) == []
    assert objects(s3store) == {}


def test_install_refuses_file_swapped_after_validation(s3store, base_spec, tiny_adapters, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_adapters["a"], src)
    manifest = validate_adapter(src, base_spec, max_rank=16, max_bytes=10**7)
    shutil.copy(tiny_adapters["b"] / W, src / W)
    with pytest.raises(AdapterInvalid) as ei:
        s3store.install("acme", 1, src, manifest)
    assert ei.value.code == "changed_during_copy"
    assert objects(s3store) == {}


def test_read_back_mismatch_and_failed_record_leave_nothing(registry, s3store, base_spec, config, tiny_adapters,
                                                            monkeypatch, raw_redis, prefix):
    onboard(registry, s3store, base_spec, "acme", tiny_adapters["a"], config)  # v1 must survive
    before = objects(s3store)
    # The store hands back other bytes than were uploaded: refused, the upload deleted.
    monkeypatch.setattr(s3store, "_sha256_of", lambda key: "0" * 64)
    with pytest.raises(StoreError, match="other bytes"):
        onboard(registry, s3store, base_spec, "acme", tiny_adapters["b"], config)
    monkeypatch.undo()
    assert objects(s3store) == before and registry.get("acme").version == 1

    # Redis fails at the commit point, after the objects were written and read back: they are deleted.
    written = []
    real_install = s3store.install

    def install_then_check(*a, **kw):
        rel = real_install(*a, **kw)
        written.append(set(objects(s3store)) - set(before))
        return rel

    def boom(record):
        raise RegistryUnavailable("injected: Redis went away before the record was written")

    monkeypatch.setattr(s3store, "install", install_then_check)
    monkeypatch.setattr(registry, "put_new_version", boom)
    with pytest.raises(RegistryUnavailable, match="injected"):
        onboard(registry, s3store, base_spec, "newco", tiny_adapters["b"], config)
    monkeypatch.undo()
    assert len(written[0]) == 2  # the upload really happened
    assert objects(s3store) == before and s3store.tenant_versions("newco") == []
    assert not raw_redis.exists(f"{prefix}:tenant:newco")
    assert onboard(registry, s3store, base_spec, "acme", tiny_adapters["b"], config).version == 3


def test_open_store_picks_the_store(tmp_path, s3, bucket):
    assert type(open_store(tmp_path / "local")) is AdapterStore
    assert type(open_store(str(tmp_path / "local"), "http://ignored")) is AdapterStore
    assert isinstance(open_store(f"s3://{bucket}", s3.url), S3AdapterStore)
    for bad in ["gs://bucket/x", "s3://", "s3:///x"]:
        with pytest.raises(ConfigError) as ei:
            open_store(bad)
        assert ei.value.key == "adapter_store"



def test_unreachable_store_is_a_store_error_not_a_crash(registry, base_spec, config, tiny_adapters, monkeypatch,
                                                        raw_redis, prefix):
    """An endpoint nobody answers: reads refuse the adapter (missing_file: the worker falls back),
    onboarding and the CLI's checks raise StoreError (tenantctl's exit 1), no record is written."""
    from loraplex_testing.services import free_port
    from tenant_registry.schema import TenantRecord

    for k, v in S3Server(Path("unused")).env.items():
        monkeypatch.setenv(k, v)
    store = open_store("s3://nobody-bucket/a", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreError, match="nobody-bucket"):
        onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
    assert not raw_redis.exists(f"{prefix}:tenant:acme")
    rec = TenantRecord(tenant_id="acme", adapter_id="acme@v1", version=1, path="acme/v1", sha256="0" * 64, rank=4,
                       alpha=8.0, use_rslora=False, target_modules=("q_proj",), base_model="x", status="enabled",
                       created_at=0.0, updated_at=0.0, nbytes=1)
    with pytest.raises(StoreError, match="nobody-bucket"):
        store.has(rec)
    with pytest.raises(AdapterInvalid) as ei:
        store.read(rec)
    assert ei.value.code == "missing_file" and "unreadable" in str(ei.value)
