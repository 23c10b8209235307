"""Per-tenant keys: generation, salted digest, constant-time verify, storage in Redis (digest only),
issuance at first onboarding, rotation, removal."""
from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from tenant_registry.errors import InvalidTenantId, TenantNotFound
from tenant_registry.keys import (MAX_KEY_CHARS, KeyDigest, KeyDigestError, digest_key, generate_key,
                                  verify_key)
from tenant_registry.onboarding import ensure_key, onboard, rotate_key

from .test_registry import _drain, _events, _rec
from .util import keys_under


def _all_values(raw_redis, prefix: str) -> list[bytes]:
    """Every key name and every stored byte string under the prefix, whatever the type."""
    out: list[bytes] = []
    for k in keys_under(raw_redis, prefix):
        out.append(k)
        kind = raw_redis.type(k)
        if kind == b"string":
            out.append(raw_redis.get(k))
        elif kind == b"hash":
            for f, v in raw_redis.hgetall(k).items():
                out += [f, v]
        elif kind == b"set":
            out += list(raw_redis.smembers(k))
        else:
            pytest.fail(f"unexpected Redis type {kind!r} at {k!r}")
    return out


# ---------------------------------------------------------------------------- pure functions
def test_generate_key_is_random_and_url_safe():
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for k in keys:
        assert k.startswith("lpx_") and len(k) == 47
        assert all(c.isalnum() or c in "-_" for c in k)


def test_digest_and_verify():
    key = generate_key()
    d = digest_key(key)
    assert d.digest != key and key not in d.to_json() and len(d.salt) == 32 and len(d.digest) == 64
    assert abs(d.created_at - time.time()) < 5
    assert verify_key(d, key) is True
    other = digest_key(key)
    assert other.salt != d.salt and other.digest != d.digest  # salted: same key, different digests
    assert verify_key(other, key) is True
    assert digest_key(key, salt=d.salt).digest == d.digest    # deterministic for a given salt

    for wrong in [generate_key(), key + "x", key[:-1], key.upper(), " " + key, "", "lpx_"]:
        assert verify_key(d, wrong) is False
    # Never raises, whatever is presented.
    for junk in [None, 42, b"lpx_abc", key.encode(), [key], {"k": key}, "\ud800", "x" * (MAX_KEY_CHARS + 1),
                 "x" * 10_000_000, key + "\x00"]:
        assert verify_key(d, junk) is False
    assert verify_key(None, key) is False and verify_key("not a digest", key) is False


def test_verify_is_fast():
    key = generate_key()
    d = digest_key(key)
    t0 = time.perf_counter()
    for _ in range(2000):
        verify_key(d, key)
    assert (time.perf_counter() - t0) / 2000 < 200e-6  # microseconds, not a slow KDF


def test_digest_key_refusals():
    for bad in [None, 1, b"k"]:
        with pytest.raises(TypeError):
            digest_key(bad)
    for bad in ["", "x" * (MAX_KEY_CHARS + 1)]:
        with pytest.raises(ValueError):
            digest_key(bad)
    for bad_salt in ["", "ab", "G" * 32, "AB" * 16, "ab" * 17]:
        with pytest.raises(KeyDigestError):
            digest_key("k", salt=bad_salt)


def test_key_digest_json_round_trip_and_strictness():
    d = digest_key(generate_key())
    assert KeyDigest.from_json(d.to_json()) == d
    assert KeyDigest.from_json(d.to_json().encode()) == d
    good = json.loads(d.to_json())
    for mutate in [lambda x: x.pop("salt"), lambda x: x.update(extra=1), lambda x: x.update(salt="zz"),
                   lambda x: x.update(digest=x["digest"].upper()), lambda x: x.update(digest="ab"),
                   lambda x: x.update(created_at="now"), lambda x: x.update(created_at=True),
                   lambda x: x.update(created_at=None), lambda x: x.update(salt=123)]:
        data = dict(good)
        mutate(data)
        with pytest.raises(KeyDigestError):
            KeyDigest.from_json(json.dumps(data))
    for garbage in ["", "[]", "{", b"\xff", "null", '"x"']:
        with pytest.raises(KeyDigestError):
            KeyDigest.from_json(garbage)
    with pytest.raises(KeyDigestError):
        KeyDigest.from_json('{"salt": "00", "digest": "00", "created_at": NaN}')


# ---------------------------------------------------------------------------- registry
def test_set_get_key_digest_and_event(registry):
    assert registry.get_key_digest("nobody") is None
    with pytest.raises(InvalidTenantId):
        registry.get_key_digest("../x")
    with pytest.raises(TenantNotFound):  # no digest without a tenant
        registry.set_key_digest("acme", digest_key(generate_key()))
    q, stop, th = _events(registry)
    try:
        registry.put_new_version(_rec("acme", registry.next_version("acme")))
        registry.put_new_version(_rec("acme", registry.next_version("acme")))
        d = digest_key(generate_key())
        assert registry.set_key_digest("acme", d) is None
        assert registry.get_key_digest("acme") == d
        d2 = digest_key(generate_key())
        assert registry.add_key_digest("acme", d2) is False  # already has one: unchanged
        assert registry.get_key_digest("acme") == d
        registry.set_key_digest("acme", d2)
        assert registry.get_key_digest("acme") == d2
        events = _drain(q, 4)
        assert _drain(q, 1, timeout=0.3) == []  # add_key_digest that stored nothing published nothing
    finally:
        stop.set()
        th.join(5)
    assert events[2:] == [{"tenant": "acme", "version": 2, "kind": "key"}] * 2
    with pytest.raises(TypeError):
        registry.set_key_digest("acme", {"salt": "x"})


def test_corrupt_stored_digest_is_an_error(registry, raw_redis, prefix):
    raw_redis.set(f"{prefix}:key:acme", b'{"salt": "00"}')
    with pytest.raises(KeyDigestError):
        registry.get_key_digest("acme")


def test_onboarding_issues_key_once_and_never_stores_it(registry, store, base_spec, config, tiny_adapters,
                                                       raw_redis, prefix):
    onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
    key = ensure_key(registry, "acme")
    assert key is not None and key.startswith("lpx_")
    d = registry.get_key_digest("acme")
    assert verify_key(d, key) and d.digest != key
    # A later onboarding of the same tenant keeps the key.
    onboard(registry, store, base_spec, "acme", tiny_adapters["b"], config)
    assert ensure_key(registry, "acme") is None
    assert registry.get_key_digest("acme") == d and verify_key(registry.get_key_digest("acme"), key)

    # Only the salted digest is in Redis: the key appears in no key name and no value, in any form.
    stored = b"\n".join(_all_values(raw_redis, prefix))
    assert f"{prefix}:key:acme".encode() in stored
    assert key.encode() not in stored and key[4:].encode() not in stored
    assert d.digest.encode() in stored

    with pytest.raises(TenantNotFound):
        ensure_key(registry, "ghost")


def test_concurrent_first_keys_issue_exactly_one(registry):
    registry.put_new_version(_rec("acme", registry.next_version("acme")))
    results: list = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        results.append(ensure_key(registry, "acme"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    issued = [k for k in results if k is not None]
    assert len(results) == 8 and len(issued) == 1
    assert verify_key(registry.get_key_digest("acme"), issued[0])


def test_rotate_invalidates_old_key_and_remove_deletes_digest(registry, raw_redis, prefix):
    registry.put_new_version(_rec("acme", registry.next_version("acme")))
    old = ensure_key(registry, "acme")
    new = rotate_key(registry, "acme")
    assert new != old
    d = registry.get_key_digest("acme")
    assert verify_key(d, new) and not verify_key(d, old)
    with pytest.raises(TenantNotFound):
        rotate_key(registry, "ghost")
    registry.remove("acme")
    assert registry.get_key_digest("acme") is None
    assert keys_under(raw_redis, prefix) == [f"{prefix}:version_seq:acme".encode()]
    # Re-onboarding after remove issues a fresh key (the old one never comes back).
    registry.put_new_version(_rec("acme", registry.next_version("acme")))
    again = ensure_key(registry, "acme")
    assert again not in (old, new) and not verify_key(registry.get_key_digest("acme"), new)


def test_key_event_reaches_subscribers_of_a_worker(registry):
    """What a worker's cache relies on: rotation publishes an event naming the tenant."""
    registry.put_new_version(_rec("acme", 1))
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    th = registry.subscribe(q.put, stop)
    time.sleep(0.3)
    try:
        rotate_key(registry, "acme")
        assert _drain(q, 1) == [{"tenant": "acme", "version": 1, "kind": "key"}]
    finally:
        stop.set()
        th.join(5)
