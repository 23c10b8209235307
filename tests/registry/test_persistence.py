"""The Redis config the project ships (scripts/redis.conf) keeps the registry across a Redis restart.

A private redis-server is started exactly as the scripts start it (`redis-server scripts/redis.conf
--port P --dir D`), tenants are onboarded, Redis is stopped (a clean SHUTDOWN, then a SIGKILL with no
chance to flush) and restarted on the same dir; every record, history, status, key digest and version
counter must be back.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from loraplex_testing.services import free_port
from tenant_registry.backup import export_registry
from tenant_registry.keys import verify_key
from tenant_registry.onboarding import ensure_key, onboard, rotate_key
from tenant_registry.registry import TenantRegistry
from tenant_registry.store import AdapterStore

REDIS_CONF = Path(__file__).resolve().parents[2] / "scripts" / "redis.conf"


class _ShippedRedis:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed")
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen([exe, str(REDIS_CONF), "--port", str(self.port), "--dir", str(self.workdir)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            for _ in range(200):  # up to ~10 s: ready means it answers PING after loading the AOF
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        finally:
            client.close()
        pytest.fail(f"redis-server with {REDIS_CONF} did not start: {(self.workdir / 'redis.log').read_text()[-2000:]}")

    def shutdown(self) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            client.shutdown()  # clean: Redis fsyncs the append-only file and exits
        except redis.ConnectionError:
            pass
        finally:
            client.close()
        assert self.proc.wait(timeout=10) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # no shutdown path at all
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _without_time(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "exported_at"}


def test_shipped_config_persists_registry_across_restart(tmp_path, base_spec, config, tiny_adapters):
    assert "appendonly yes" in REDIS_CONF.read_text()
    data = tmp_path / "redis-data"
    data.mkdir()
    server = _ShippedRedis(data)
    server.start()
    store = AdapterStore(tmp_path / "store")
    try:
        raw = redis.Redis.from_url(server.url)
        assert raw.config_get("appendonly") == {"appendonly": "yes"}  # it is the shipped file that did it
        raw.close()

        reg = TenantRegistry(server.url, config.redis_prefix)
        onboard(reg, store, base_spec, "acme", tiny_adapters["a"], config)
        onboard(reg, store, base_spec, "acme", tiny_adapters["b"], config)
        acme_key = ensure_key(reg, "acme")
        onboard(reg, store, base_spec, "zeta", tiny_adapters["c"], config)
        assert ensure_key(reg, "zeta") is not None
        zeta_key = rotate_key(reg, "zeta")
        reg.set_status("zeta", "disabled")
        before = export_registry(reg)
        reg.close()

        # 1. Clean shutdown and restart on the same dir.
        server.shutdown()
        assert any(data.rglob("*.aof")), "no append-only file written"
        server.start()
        reg = TenantRegistry(server.url, config.redis_prefix)
        assert _without_time(export_registry(reg)) == _without_time(before)
        assert reg.get("acme").adapter_id == "acme@v2" and [h.version for h in reg.history("acme")] == [1, 2]
        assert reg.get("zeta").status == "disabled"
        assert verify_key(reg.get_key_digest("acme"), acme_key)
        assert verify_key(reg.get_key_digest("zeta"), zeta_key)

        # 2. A write acknowledged just before the process is SIGKILLed survives too (the AOF is
        #    written before Redis replies; only an OS crash could lose up to ~1 s with everysec).
        new_key = rotate_key(reg, "acme")
        reg.rollback("acme")
        after = export_registry(reg)
        reg.close()
        server.kill()
        server.start()
        reg = TenantRegistry(server.url, config.redis_prefix)
        assert _without_time(export_registry(reg)) == _without_time(after)
        assert reg.get("acme").adapter_id == "acme@v1"
        assert verify_key(reg.get_key_digest("acme"), new_key) and not verify_key(reg.get_key_digest("acme"), acme_key)
        assert reg.next_version("acme") == 3  # the counter persisted as well
        reg.close()
    finally:
        server.stop()
