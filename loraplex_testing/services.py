"""The real services loraplex runs on: a private `redis-server` and a `torchserve`,
both on 127.0.0.1. Used by the demo and `scripts/localstack.py` (make demo / make
stop), the end-to-end tests and the benchmarks, so there is one way to run them.

Why our own process handling instead of `torchserve --stop`: that command keeps
one pid file per machine (in the temp dir), so a demo and a test run could not
coexist. Each instance here gets its own working dir (where TorchServe writes
key_file.json and logs/) and its own TMPDIR, and is stopped by pid.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Iterator
import time
from pathlib import Path

import urllib.error
import urllib.request

ROOT = Path(__file__).resolve().parent.parent


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server; `persistent=True` uses the shipped config (append-only file on)."""

    def __init__(self, port: int, workdir: Path, persistent: bool = False) -> None:
        self.port = port
        self.workdir = Path(workdir)
        self.persistent = persistent
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        if self.persistent:
            return [exe, str(ROOT / "scripts" / "redis.conf"), "--port", str(self.port), "--dir", str(self.workdir)]
        return [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]

    def start(self, detach: bool = False) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=detach)
        if not wait_port(self.port, 10):
            raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.workdir}/redis.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


class TorchServe:
    """One torchserve instance with its own config, model store, working dir and ports."""

    def __init__(self, workdir: Path, model_store: Path, *, model_name: str = "loraplex",
                 ports: tuple[int, int, int] | None = None, env: dict[str, str] | None = None,
                 extra_config: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.model_store = Path(model_store)
        self.model_name = model_name
        self.ports = ports or (free_port(), free_port(), free_port())
        self.env = env or {}
        self.extra_config = extra_config or {}
        self.proc: subprocess.Popen | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}"

    def write_config(self) -> Path:
        """Our shipped config.properties with this instance's ports and store; auth stays on."""
        lines = []
        for line in (ROOT / "config.properties").read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            if key in {"inference_address", "management_address", "metrics_address", "model_store",
                       "load_models", *self.extra_config}:
                continue
            lines.append(line)
        inf, mgmt, metrics = self.ports
        lines += [f"inference_address=http://127.0.0.1:{inf}", f"management_address=http://127.0.0.1:{mgmt}",
                  f"metrics_address=http://127.0.0.1:{metrics}", f"model_store={self.model_store}",
                  f"load_models={self.model_name}"]
        lines += [f"{k}={v}" for k, v in self.extra_config.items()]
        path = self.workdir / "config.properties"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 300, detach: bool = False) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        cfg = self.write_config()
        exe = Path(sys.executable).parent / "torchserve"
        env = {**os.environ, **self.env, "TMPDIR": str(self.workdir / "tmp"), "LOG_LOCATION": str(self.workdir / "logs"),
               "METRICS_LOCATION": str(self.workdir / "logs"),
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        log = open(self.workdir / "torchserve.out", "ab")
        self.proc = subprocess.Popen([str(exe), "--start", "--foreground", "--ncs", "--ts-config", str(cfg),
                                      "--model-store", str(self.model_store)],
                                     cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        (self.workdir / "torchserve.pid").write_text(str(self.proc.pid))
        self.wait_ready(timeout)

    def keys(self) -> dict:
        return json.loads((self.workdir / "key_file.json").read_text())

    def wait_ready(self, timeout: float) -> None:
        """Ready = the model has a READY worker (the handler's initialize finished)."""
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.proc.returncode}; see {self.workdir}/logs")
            with contextlib.suppress(Exception):
                status = self.describe(customized=False)
                workers = status[0].get("workers", [])
                last = json.dumps(workers)
                if any(w.get("status") == "READY" for w in workers):
                    return
            time.sleep(0.5)
        raise RuntimeError(f"torchserve model {self.model_name} not ready after {timeout}s: {last}; "
                           f"see {self.workdir}/logs/model_log.log")

    def describe(self, customized: bool = True) -> list:
        url = f"{self.management_url}/models/{self.model_name}" + ("?customized=true" if customized else "")
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.keys()['management']['key']}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        stop_pid_file(self.workdir / "torchserve.pid")
        self.proc = None


def stop_pid_file(pid_file: Path, timeout: float = 30) -> None:
    """Stop the process group whose leader's pid the file holds (frontend + Python workers)."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().strip() or 0)
    pid_file.unlink()
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)


# -- the demo's stack (make demo / make stop) ----------------------------------------------

DEMO_REDIS_PORT = 6399
DEMO_TS_PORTS = (8080, 8081, 8082)


def start_demo_stack(var: Path) -> None:
    """Start the demo's redis-server (6399, shipped redis.conf) and torchserve (8080-8082), detached,
    unless they already listen. State (pid files, keys, logs, Redis's AOF) lives under `var`."""
    redis = RedisServer(DEMO_REDIS_PORT, var / "redis", persistent=True)
    if not wait_port(DEMO_REDIS_PORT, 0.2):
        redis.start(detach=True)
        (var / "redis.pid").write_text(str(redis.proc.pid))
    env = {"LORAPLEX_REDIS_URL": redis.url, "LORAPLEX_ADAPTER_STORE": str(var / "adapters")}
    ts = TorchServe(var / "torchserve", ROOT / "model_store", ports=DEMO_TS_PORTS, env=env)
    if wait_port(DEMO_TS_PORTS[0], 0.2):
        print(f"torchserve already listening on 127.0.0.1:{DEMO_TS_PORTS[0]}")
        return
    ts.start(detach=True)
    print(f"torchserve ready: {ts.inference_url} (keys in {ts.workdir}/key_file.json)")


def stop_demo_stack(var: Path) -> None:
    stop_pid_file(var / "torchserve" / "torchserve.pid")
    stop_pid_file(var / "redis.pid")
    print("stopped torchserve and redis-server")


@contextlib.contextmanager
def redis_server(port: int | None = None, workdir: Path | None = None) -> Iterator[tuple[str, "RedisProc"]]:
    """Start a real, private `redis-server` on 127.0.0.1 and yield (url, process handle)."""
    proc = RedisProc(port or free_port(), workdir)
    proc.start()
    try:
        yield proc.url, proc
    finally:
        proc.stop()
        proc.cleanup()


class RedisProc(RedisServer):
    """A redis-server child process that tests may stop and restart (outage tests)."""

    def __init__(self, port: int, workdir: Path | None = None) -> None:
        self._own_dir = workdir is None
        super().__init__(port, Path(workdir or tempfile.mkdtemp(prefix="loraplex-redis-")))

    def cleanup(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
