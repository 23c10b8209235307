"""The private services the tests, benchmarks and demo run on leave nothing behind:
a failed start stops what it started, and a test process that dies without its
cleanup (SIGKILL) still takes its redis-server with it (loraplex_testing.reaper)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraplex_testing.services import WORKER_PORT_RANGE, RedisServer, TorchServe, free_port, free_port_range, free_ports


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _redis_pids_on(port: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if "redis-server" in line and f"--port {port}" in line or f"redis-server 127.0.0.1:{port}" in line]


def test_redis_start_on_a_taken_port_fails_and_leaves_nothing(tmp_path):
    with socket.socket() as squatter:  # someone else listens there: not our server
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        redis = RedisServer(port, tmp_path / "redis")
        with pytest.raises(RuntimeError, match="exited"):
            redis.start()
    assert redis.proc is None and _redis_pids_on(port) == []


def test_redis_dies_with_the_process_that_started_it(tmp_path):
    """The owner is SIGKILLed (no finally, no atexit): its guard stops the redis-server."""
    port = free_port()
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from loraplex_testing.services import RedisServer
        r = RedisServer({port}, Path({str(tmp_path / 'redis')!r}))
        r.start()
        print(r.proc.pid, flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        redis_pid = int(owner.stdout.readline())
        assert _alive(redis_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        assert _wait_dead(redis_pid, 15), "redis-server outlived the process that started it"
    finally:
        if owner.poll() is None:
            owner.kill()
        for pid in _redis_pids_on(port):
            os.kill(pid, signal.SIGKILL)


def test_stop_is_idempotent_and_restart_works(tmp_path):
    redis = RedisServer(free_port(), tmp_path / "redis")
    redis.start()
    first = redis.proc.pid
    redis.stop()
    redis.stop()
    assert _wait_dead(first, 5)
    redis.start()
    try:
        assert redis.proc.pid != first and _alive(redis.proc.pid)
    finally:
        redis.stop()


def test_each_torchserve_gets_private_temp_dir_and_ports(tmp_path):
    """Config and environment only (the e2e tests start real instances side by side)."""
    a, b = (TorchServe(tmp_path / n, tmp_path / "store") for n in ("a", "b"))
    configs = []
    for ts in (a, b):
        ts._make_tmpdir()
        ts.private_ports = ts._pick_private_ports()
        props = dict(line.split("=", 1) for line in ts.write_config().read_text().splitlines()
                     if "=" in line and not line.startswith("#"))
        configs.append(props)
        assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
        assert {props["grpc_inference_port"], props["grpc_management_port"]}.isdisjoint({"7070", "7071"})
        assert props["initial_worker_port"] != "9000"
        assert ts.tmpdir == (ts.workdir / "tmp") and ts.tmpdir.is_dir()
    ranges = [set(range(int(c["initial_worker_port"]), int(c["initial_worker_port"]) + WORKER_PORT_RANGE))
              for c in configs]
    singles = [{int(c[k]) for k in ("grpc_inference_port", "grpc_management_port", "initial_distribution_port")}
               | {int(c[k].rsplit(":", 1)[1]) for k in ("inference_address", "management_address",
                                                         "metrics_address")} for c in configs]
    assert all(len(s) == 6 for s in singles)
    assert not (ranges[0] | singles[0]) & singles[1] and not ranges[1] & singles[0]


def test_torchserve_temp_dir_is_short_enough_for_the_worker_socket(tmp_path):
    deep = tmp_path / ("d" * 90)
    ts = TorchServe(deep, tmp_path / "store")
    tmp = ts._make_tmpdir()
    try:
        assert len(f"{tmp}/.ts.sock.65535") <= 107 and tmp.is_dir()
    finally:
        ts.stop()  # removes the short dir it made
    assert not tmp.exists()


def test_free_ports_are_distinct():
    ports = free_ports(50)
    assert len(set(ports)) == 50


def test_a_port_is_never_handed_out_twice_even_once_free_again():
    """A picked port stays unbound until its user binds it, so a later pick must not return it (the
    kernel would: 2000 one-port picks from ~28k ephemeral ports repeat some with near certainty)."""
    picks = [free_port() for _ in range(2000)] + free_ports(10)
    base = free_port_range(WORKER_PORT_RANGE)
    assert len(set(picks)) == len(picks)
    assert free_port_range(WORKER_PORT_RANGE) not in range(base - WORKER_PORT_RANGE + 1, base + WORKER_PORT_RANGE)
