"""Adapter store and atomic onboarding."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import pytest

from tenant_registry.errors import AdapterInvalid, RegistryUnavailable
from tenant_registry.onboarding import onboard
from tenant_registry.store import StoreError
from tenant_registry.validate import validate_adapter

from .util import files_under


def test_onboard_copies_only_the_two_files(registry, store, base_spec, config, tiny_adapters, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_adapters["b"], src)
    (src / "training_args.json").write_text("{}")
    (src / "sub").mkdir()
    (src / "sub" / "x.txt").write_text("x")
    rec = onboard(registry, store, base_spec, "acme", src, config)
    assert rec.adapter_id == "acme@v1" and rec.path == "acme/v1" and rec.status == "enabled"
    assert (rec.rank, rec.alpha, rec.target_modules) == (8, 32.0, ("q_proj", "v_proj"))
    d = store.path_for(rec)
    assert d == (store.root / "acme" / "v1").resolve()
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not any(p.is_symlink() for p in d.iterdir())
    assert (d / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    # Nothing left in staging, and the worker side reads from the store, not from src.
    assert list((store.root / ".staging").iterdir()) == []
    shutil.rmtree(src)
    assert store.verify(rec) == d
    assert registry.get("acme") == rec


def test_read_returns_the_bytes_it_hashed(registry, store, base_spec, config, tiny_adapters):
    rec = onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
    d = store.path_for(rec)
    got = store.read(rec)
    assert got.name == "acme@v1" and got.sha256 == rec.sha256
    assert got.weights == (d / "adapter_model.safetensors").read_bytes()
    assert got.config == (d / "adapter_config.json").read_bytes()
    assert hashlib.sha256(got.weights).hexdigest() == rec.sha256


def test_read_detects_alteration(registry, store, base_spec, config, tiny_adapters):
    rec = onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
    w = store.path_for(rec) / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(AdapterInvalid) as ei:
        store.read(rec)
    assert ei.value.code == "sha256_mismatch" and "acme@v1" in str(ei.value)
    with pytest.raises(AdapterInvalid):
        store.verify(rec)  # verify is read's checks
    w.unlink()
    with pytest.raises(AdapterInvalid) as ei:
        store.read(rec)
    assert ei.value.code == "missing_file"


def test_verify_detects_config_change(registry, store, base_spec, config, tiny_adapters):
    rec = onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
    c = store.path_for(rec) / "adapter_config.json"
    cfg = json.loads(c.read_text())
    cfg["lora_alpha"] = 999
    c.write_text(json.dumps(cfg))
    with pytest.raises(AdapterInvalid) as ei:
        store.read(rec)
    assert ei.value.code == "config_mismatch"


def test_path_for_refuses_escapes(registry, store, base_spec, config, tiny_adapters, tmp_path):
    rec = onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
    # A record can't even be built with '..' or an absolute path; bypass the schema to test the store's own check.
    for bad in ["../outside", "/etc", "acme/../../x", ".staging/x"]:
        forged = dataclasses.replace(rec)
        object.__setattr__(forged, "path", bad)
        with pytest.raises(StoreError):
            store.path_for(forged)
    # A symlink planted inside the store that leads outside is refused too.
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, store.root / "acme" / "v9")
    forged = dataclasses.replace(rec)
    object.__setattr__(forged, "path", "acme/v9")
    with pytest.raises(StoreError, match="escapes"):
        store.path_for(forged)


def test_install_refuses_file_swapped_after_validation(store, base_spec, tiny_adapters, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_adapters["a"], src)
    manifest = validate_adapter(src, base_spec, max_rank=16, max_bytes=10**7)
    shutil.copy(tiny_adapters["b"] / "adapter_model.safetensors", src / "adapter_model.safetensors")
    with pytest.raises(AdapterInvalid) as ei:
        store.install("acme", 1, src, manifest)
    assert ei.value.code == "changed_during_copy"
    assert [p for p in files_under(store.root) if p.name != ".staging"] == []


def test_injected_failure_between_copy_and_record_leaves_nothing(registry, store, base_spec, config,
                                                                  tiny_adapters, monkeypatch, raw_redis, prefix):
    onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)  # v1 exists and must survive
    copied = []
    real_install = store.install

    def install_then_record(*a, **kw):
        rel = real_install(*a, **kw)
        copied.append(store.root / rel)
        assert (store.root / rel / "adapter_model.safetensors").exists()  # the copy really happened
        return rel

    def boom(record):
        raise RegistryUnavailable("injected: Redis went away before the record was written")

    monkeypatch.setattr(store, "install", install_then_record)
    monkeypatch.setattr(registry, "put_new_version", boom)
    with pytest.raises(RegistryUnavailable, match="injected"):
        onboard(registry, store, base_spec, "acme", tiny_adapters["b"], config)
    assert copied and not copied[0].exists()  # no orphan files
    assert store.tenant_versions("acme") == [1]
    assert registry.get("acme").version == 1 and [r.version for r in registry.history("acme")] == [1]
    # A brand-new tenant failing the same way leaves neither a record nor a directory.
    with pytest.raises(RegistryUnavailable):
        onboard(registry, store, base_spec, "newco", tiny_adapters["b"], config)
    assert not (store.root / "newco").exists()
    assert not raw_redis.exists(f"{prefix}:tenant:newco") and not raw_redis.exists(f"{prefix}:history:newco")
    monkeypatch.undo()
    # The next attempt succeeds with a fresh version number (the failed one is never reused).
    assert onboard(registry, store, base_spec, "acme", tiny_adapters["b"], config).version == 3


def test_remove_version_and_tenant(store, base_spec, tiny_adapters):
    m = validate_adapter(tiny_adapters["a"], base_spec, max_rank=16, max_bytes=10**7)
    store.install("acme", 1, tiny_adapters["a"], m)
    store.install("acme", 2, tiny_adapters["a"], m)
    with pytest.raises(StoreError, match="never overwritten"):
        store.install("acme", 2, tiny_adapters["a"], m)
    assert store.tenant_versions("acme") == [1, 2]
    store.remove_version("acme", 1)
    assert store.tenant_versions("acme") == [2]
    store.remove_tenant("acme")
    assert not (store.root / "acme").exists()
    store.remove_tenant("acme")  # idempotent


def test_reads_reuse_one_buffer_and_return_each_files_bytes(registry, store, base_spec, config, tiny_adapters):
    """The store reads every adapter's weights into one reused buffer (no fresh allocation, so no
    page faults, per load): each read returns exactly its own file's bytes, the buffer grows to
    the largest, and a file that shrinks while it is read is an error, not a short adapter."""
    from loraplex_common.adapter_format import ReadBuffer, read_file

    recs = [onboard(registry, store, base_spec, t, tiny_adapters[n], config) for t, n in (("ra", "a"), ("rb", "c"))]
    sizes = []
    for rec in recs * 2:
        got = store.read(rec)
        want = (store.path_for(rec) / "adapter_model.safetensors").read_bytes()
        assert bytes(got.weights) == want and got.sha256 == hashlib.sha256(want).hexdigest()
        sizes.append(len(want))
    assert store._weights_buffer.nbytes == max(sizes)

    buf = ReadBuffer()
    first, second = buf(10), buf(4)
    assert first.obj is second.obj  # the same memory handed out again
    path = store.path_for(recs[0]) / "adapter_model.safetensors"
    with open(path, "rb") as fh, pytest.raises(OSError, match="changed size"):
        read_file(fh, path.stat().st_size + 1, buf)
    with open(path, "rb") as fh, pytest.raises(OSError, match="changed size"):
        read_file(fh, path.stat().st_size - 1)
