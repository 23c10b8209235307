"""The real services loraplex runs on: a private `redis-server` and a `torchserve`,
both on 127.0.0.1. Used by the demo and `scripts/localstack.py` (make demo / make
stop), the end-to-end tests and the benchmarks, so there is one way to run them.

Every TorchServe started here is private, so a demo, a test run and several
scale-out instances can share one machine. What TorchServe 0.12 would otherwise
share machine-wide, and what each instance gets instead:

- the launcher's pid file, `<tempfile.gettempdir()>/.model_server.pid` (a second
  launcher seeing a live one refuses to start): TMPDIR = the instance's own dir;
- the worker socket, `<java.io.tmpdir>/.ts.sock.<port>`: Java ignores TMPDIR (its
  tmpdir stays /tmp), but the launcher passes `-Djava.io.tmpdir=$TEMP`, so TEMP =
  the same private dir. A starting worker deletes whatever file has its socket
  name, which is how one instance's start used to delete another's socket;
- the worker ports (`initial_worker_port`, 9000 up, one per worker and restart;
  the socket names' suffix, or TCP ports where Netty has no native transport)
  and torchrun's `initial_distribution_port`: a checked-free range per instance;
- the gRPC servers, which 0.12 always starts (no setting turns them off), on
  7070/7071: free loopback ports per instance;
- key_file.json, logs/ and the config are in the instance's working dir.

Processes: each service runs in its own process group and is stopped by group
(launcher, Java frontend and Python workers together). A service started for a
test (`detach=False`) also gets a `reaper.Guard`, which stops the group when the
test process dies without running its cleanup; `start()` stops what it started
when it fails. The demo's detached services are stopped by pid file (`make stop`).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from loraplex_testing.reaper import Guard, kill_group

ROOT = Path(__file__).resolve().parent.parent

# Ports one TorchServe may hand its workers (initial_worker_port upwards): one per
# worker start, restarts included.
WORKER_PORT_RANGE = 64
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the NUL


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        time.sleep(0.05)
    return False


# Every port this process has handed out (free_ports, free_port_range), never handed out again: a
# port is free when picked but may be bound only later (a TorchServe's gRPC ports at its start),
# and in between it must not go to another component. Without this a stack restart could give
# an instance's new gRPC port the just-stopped nginx's port, which the restarted nginx then
# found "listening" (tests/e2e/test_scaleout_short.py saw HTTP/2 frames for every request).
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free right now and never handed out before by this process
    (all held open until all are picked)."""
    socks = []
    with _HANDED_OUT_LOCK:
        try:
            ports: list[int] = []
            while len(ports) < n:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
                if port not in _HANDED_OUT:
                    ports.append(port)
            _HANDED_OUT.update(ports)
            return ports
        finally:
            for s in socks:
                s.close()


def free_port() -> int:
    return free_ports(1)[0]


def free_port_range(n: int, low: int = 10000, high: int = 32000, tries: int = 200) -> int:
    """First port of `n` consecutive loopback ports all free right now and never handed out before
    by this process. Drawn below Linux's ephemeral range (32768+), so connections and
    `free_port()` do not take them meanwhile."""
    rng = random.Random()
    with _HANDED_OUT_LOCK:
        for _ in range(tries):
            base = rng.randrange(low, high - n)
            if _HANDED_OUT.intersection(range(base, base + n)):
                continue
            socks = []
            try:
                for port in range(base, base + n):
                    s = socket.socket()
                    socks.append(s)
                    s.bind(("127.0.0.1", port))
                _HANDED_OUT.update(range(base, base + n))
                return base
            except OSError:
                continue
            finally:
                for s in socks:
                    s.close()
    raise RuntimeError(f"no {n} consecutive free ports in [{low}, {high})")


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float, failure: Callable[[], str]) -> None:
    """Until `proc` listens on 127.0.0.1:`port`; RuntimeError(failure()) if it exits or `timeout` passes."""
    deadline = time.time() + timeout
    while not wait_port(port, 0.2):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(failure())


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class RedisServer:
    """A private redis-server; `persistent=True` uses the shipped config (append-only file on)."""

    def __init__(self, port: int, workdir: Path, persistent: bool = False) -> None:
        self.port = port
        self.workdir = Path(workdir)
        self.persistent = persistent
        self.proc: subprocess.Popen | None = None
        self._guard: Guard | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        if self.persistent:
            return [exe, str(ROOT / "scripts" / "redis.conf"), "--port", str(self.port), "--dir", str(self.workdir),
                    "--daemonize", "no"]
        return [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--daemonize", "no"]

    def start(self, detach: bool = False) -> None:
        """Start and wait until it accepts connections; on any failure nothing is left running."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._guard = None if detach else Guard(self.proc.pid)
            self._wait_ready(10)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:  # e.g. the port was taken: don't mistake another server for ours
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}:\n"
                                   f"{_tail(self.workdir / 'redis.log')}")
            if self._serving_pid() == self.proc.pid:
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.workdir}/redis.log")

    def _serving_pid(self) -> int | None:
        """The pid of the redis-server answering on our port once it has loaded its data (another
        server there is not ours; INFO answers while an append-only file is still loading, PING not)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        with contextlib.suppress(redis.RedisError, OSError, KeyError, ValueError):
            # One try: redis-py's default retries with backoff turn a squatter that never answers
            # into ~10 s per probe, longer than the start deadline.
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                                 retry=Retry(NoBackoff(), 0))
            try:
                info = client.info()
                return int(info["process_id"]) if int(info["loading"]) == 0 else None
            finally:
                client.close()
        return None

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:  # not reaped yet, so its pid (= its group) is still ours
                kill_group(self.proc.pid, timeout=10, leader=self.proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        if self._guard is not None:
            self._guard.release()
        self.proc, self._guard = None, None


class S3Server:
    """A private S3-compatible server for the `s3://` adapter store tests: moto's (`python -m
    moto.server`, pip `moto[s3]` + flask), in memory, on 127.0.0.1. Why moto: it implements the S3 REST
    API the real client (s3fs -> aiobotocore) speaks, signatures, multipart uploads and errors
    included (NoSuchKey -> FileNotFoundError), and s3fs's own test suite runs against it; it needs
    no binary outside PyPI. It is not a durability or consistency model of AWS (strongly consistent,
    as S3 is since 2020). `env` gives a client's AWS_* variables (moto accepts any credentials)."""

    ACCESS_KEY = "loraplex-test-key"
    SECRET_KEY = "loraplex-test-secret"
    REGION = "us-east-1"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None
        self._guard: Guard | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
                "AWS_DEFAULT_REGION": self.REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> None:
        """Start and wait until it answers; on any failure nothing is left running."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with open(self.workdir / "moto.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._guard = Guard(self.proc.pid)
            deadline = time.time() + 30
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto server exited with {self.proc.returncode} on port {self.port}:\n"
                                       f"{_tail(self.workdir / 'moto.log')}")
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1) as resp:
                        if resp.status == 200:
                            return
                if time.time() > deadline:
                    raise RuntimeError(f"moto server did not start on port {self.port}; see {self.workdir}/moto.log")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def make_bucket(self, name: str) -> None:
        import boto3  # moto's own dependency

        boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.ACCESS_KEY,
                     aws_secret_access_key=self.SECRET_KEY, region_name=self.REGION).create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                kill_group(self.proc.pid, timeout=10, leader=self.proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        if self._guard is not None:
            self._guard.release()
        self.proc, self._guard = None, None


class TorchServe:
    """One private torchserve instance: its own config, model store, working dir, temp dir and ports
    (HTTP: given or free; gRPC, worker and distribution ports: free, picked at each start)."""

    def __init__(self, workdir: Path, model_store: Path, *, model_name: str = "loraplex",
                 ports: tuple[int, int, int] | None = None, env: dict[str, str] | None = None,
                 extra_config: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store)
        self.model_name = model_name
        self.ports = ports or tuple(free_ports(3))
        self.env = env or {}
        self.extra_config = extra_config or {}
        self.private_ports: dict[str, int] = {}
        self.tmpdir: Path | None = None
        self._own_short_tmp = False
        self.proc: subprocess.Popen | None = None
        self._guard: Guard | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "torchserve.pid"

    def _pick_private_ports(self) -> dict[str, int]:
        taken = set(self.ports)
        while True:
            grpc_inf, grpc_mgmt, dist = free_ports(3)
            worker = free_port_range(WORKER_PORT_RANGE)
            picked = {grpc_inf, grpc_mgmt, dist, *range(worker, worker + WORKER_PORT_RANGE)}
            if not picked & taken:
                return {"grpc_inference_port": grpc_inf, "grpc_management_port": grpc_mgmt,
                        "initial_distribution_port": dist, "initial_worker_port": worker}

    def _make_tmpdir(self) -> Path:
        """The instance's temp dir; a short one under /tmp where the worker socket's path would not fit."""
        tmp = self.workdir / "tmp"
        self._own_short_tmp = len(str(tmp)) + len("/.ts.sock.65535") > _UNIX_PATH_MAX
        if self._own_short_tmp:
            tmp = Path(tempfile.mkdtemp(prefix="lpx-ts-", dir="/tmp"))
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmpdir = tmp
        return tmp

    def write_config(self) -> Path:
        """Our shipped config.properties with this instance's ports and store; auth stays on."""
        inf, mgmt, metrics = self.ports
        own = {"inference_address": f"http://127.0.0.1:{inf}", "management_address": f"http://127.0.0.1:{mgmt}",
               "metrics_address": f"http://127.0.0.1:{metrics}", "grpc_inference_address": "127.0.0.1",
               "grpc_management_address": "127.0.0.1", "model_store": str(self.model_store),
               "load_models": self.model_name, "metrics_config": str(ROOT / "ts_metrics.yaml"),
               **{k: str(v) for k, v in self.private_ports.items()},
               **self.extra_config}
        lines = [line for line in (ROOT / "config.properties").read_text().splitlines()
                 if line.split("=", 1)[0].strip() not in own]
        lines += [f"{k}={v}" for k, v in own.items()]
        path = self.workdir / "config.properties"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 300, detach: bool = False) -> None:
        """Start and wait for a READY worker; on any failure nothing is left running."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._make_tmpdir()
        self.private_ports = self._pick_private_ports()
        cfg = self.write_config()
        exe = Path(sys.executable).parent / "torchserve"
        env = {**os.environ, **self.env, "TMPDIR": str(self.tmpdir), "TEMP": str(self.tmpdir),
               "LOG_LOCATION": str(self.workdir / "logs"), "METRICS_LOCATION": str(self.workdir / "logs"),
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        with open(self.workdir / "torchserve.out", "ab") as log:
            self.proc = subprocess.Popen([str(exe), "--start", "--foreground", "--ncs", "--ts-config", str(cfg),
                                          "--model-store", str(self.model_store)],
                                         cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self.pid_file.write_text(str(self.proc.pid))
            self._guard = None if detach else Guard(self.proc.pid)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def keys(self) -> dict:
        return json.loads((self.workdir / "key_file.json").read_text())

    def frontend_pid(self) -> int:
        """The Java frontend's pid: the child of the `torchserve --foreground` launcher."""
        if self.proc is None:
            raise RuntimeError("torchserve is not running")
        for stat in Path("/proc").glob("[0-9]*/stat"):  # "<pid> (<comm>) <state> <ppid> ..."
            with contextlib.suppress(OSError):
                head, tail = stat.read_text().rsplit(")", 1)
                if int(tail.split()[1]) == self.proc.pid and head.endswith("(java"):
                    return int(stat.parent.name)
        raise RuntimeError(f"no java child of torchserve pid {self.proc.pid}")

    def wait_ready(self, timeout: float) -> None:
        """Ready = the model has a READY worker (the handler's initialize finished)."""
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.proc.returncode}; {self.workdir}/logs/ts_log.log "
                                   f"ends:\n{_tail(self.workdir / 'logs' / 'ts_log.log')}")
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
        """Stop the whole group (launcher, frontend, workers); safe to call twice or after a failed start."""
        _stop_started(self.proc, self.pid_file, self._guard)
        if self._own_short_tmp and self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.proc, self._guard = None, None


PLUGIN_DIR = ROOT / "build" / "plugins"


def build_plugin() -> Path:
    """Build loraplex's TorchServe plugin jar (scripts/build_plugin.sh; a no-op when up to date)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "build_plugin.sh")], check=True, cwd=ROOT, timeout=300)
    return PLUGIN_DIR


def plugin_config(onboarding_url: str) -> dict[str, str]:
    """TorchServe config lines that load the plugin (absolute plugins_path) and point it at a service."""
    return {"plugins_path": str(PLUGIN_DIR), "loraplex_onboarding_url": onboarding_url}


class OnboardingService:
    """tenant_registry/http_api.py as its own process on 127.0.0.1:`port` (free when not given),
    reading `model_config` and TorchServe's `key_file` (the management token it checks)."""

    def __init__(self, workdir: Path, model_config: Path | None, key_file: Path, *, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.model_config = model_config
        self.key_file = Path(key_file)
        self.port = port or free_port()
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self._guard: Guard | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "onboarding.pid"

    def start(self, timeout: float = 60, detach: bool = False) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tenant_registry.http_api", "--key-file", str(self.key_file),
               "--address", f"127.0.0.1:{self.port}"]
        if self.model_config is not None:
            cmd += ["--model-config", str(self.model_config)]
        with open(self.workdir / "onboarding.out", "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env={**os.environ, **self.env}, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.pid_file.write_text(str(self.proc.pid))
            self._guard = None if detach else Guard(self.proc.pid)
            _wait_listening(self.proc, self.port, timeout, lambda: (
                f"onboarding service did not start; {self.workdir}/onboarding.out ends:\n"
                f"{_tail(self.workdir / 'onboarding.out')}"))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        _stop_started(self.proc, self.pid_file, self._guard)
        self.proc, self._guard = None, None


def _stop_started(proc: subprocess.Popen | None, pid_file: Path, guard: "Guard | None") -> None:
    """Stop a service's process group: the one this object started (`proc`; also when its leader is
    gone, the rest of its group may not be), else the detached one `pid_file` names; release its guard."""
    if proc is not None:
        kill_group(proc.pid, leader=proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        pid_file.unlink(missing_ok=True)
    else:
        stop_pid_file(pid_file)
    if guard is not None:
        guard.release()


def stop_pid_file(pid_file: Path, timeout: float = 30) -> None:
    """Stop the process group whose leader's pid the file holds (a detached service: make stop)."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().strip() or 0)
    pid_file.unlink()
    kill_group(pid, timeout)


# -- the demo's stack (make demo / make stop) ----------------------------------------------

DEMO_REDIS_PORT = 6399
DEMO_TS_PORTS = (8080, 8081, 8082)
# TorchServe's default is 60 minutes, after which every request gets 400 until the token API
# renews the keys (README, "Limits"); the demo is meant to be left running and played with.
DEMO_TOKEN_EXPIRATION_MIN = 7 * 24 * 60
DEMO_ONBOARDING_PORT = 8083  # onboarding_address's default and config.properties' loraplex_onboarding_url


def start_demo_stack(var: Path) -> None:
    """Start the demo's redis-server (6399, shipped redis.conf) and torchserve (8080-8082), detached,
    unless they already listen. State (pid files, keys, logs, Redis's AOF) lives under `var`."""
    redis = RedisServer(DEMO_REDIS_PORT, var / "redis", persistent=True)
    if not wait_port(DEMO_REDIS_PORT, 0.2):
        redis.start(detach=True)
        (var / "redis.pid").write_text(str(redis.proc.pid))
    env = {"LORAPLEX_REDIS_URL": redis.url, "LORAPLEX_ADAPTER_STORE": str(var / "adapters")}
    onboarding = OnboardingService(var / "onboarding", ROOT / "model-config.yaml", var / "torchserve" / "key_file.json",
                                   port=DEMO_ONBOARDING_PORT, env=env)
    if not wait_port(DEMO_ONBOARDING_PORT, 0.2):
        onboarding.start(detach=True)
        print(f"onboarding service ready: {onboarding.url} (README 'Onboarding over HTTP')")
    ts = TorchServe(var / "torchserve", ROOT / "model_store", ports=DEMO_TS_PORTS, env=env,
                    extra_config={"token_expiration_min": str(DEMO_TOKEN_EXPIRATION_MIN),
                                  **plugin_config(onboarding.url)})
    if wait_port(DEMO_TS_PORTS[0], 0.2):
        print(f"torchserve already listening on 127.0.0.1:{DEMO_TS_PORTS[0]}")
        return
    build_plugin()
    ts.start(detach=True)
    print(f"torchserve ready: {ts.inference_url} (keys in {ts.workdir}/key_file.json)")


def stop_demo_stack(var: Path) -> None:
    stop_pid_file(var / "torchserve" / "torchserve.pid")
    stop_pid_file(var / "onboarding" / "onboarding.pid")
    stop_pid_file(var / "redis.pid")
    print("stopped torchserve, the onboarding service and redis-server")


@contextlib.contextmanager
def redis_server(port: int | None = None, workdir: Path | None = None) -> Iterator[tuple[str, "RedisProc"]]:
    """Start a real, private `redis-server` on 127.0.0.1 and yield (url, process handle)."""
    proc = RedisProc(port or free_port(), workdir)
    try:
        proc.start()
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


# -- several TorchServes behind nginx (make scaleout, bench/scaleout.py, tests/e2e/test_scaleout_short.py) --

NGINX_TEMPLATE = ROOT / "scripts" / "nginx" / "loraplex-tenant-hash.conf"
NGINX_INSTANCE_TEMPLATE = ROOT / "scripts" / "nginx" / "loraplex-instance.conf"
HASH_BY_TENANT = "hash $http_x_tenant_id consistent;"
ROUND_ROBIN = "# round robin (nginx's default balancing)"


def _fill(template: str, fields: dict[str, str]) -> str:
    for name, value in fields.items():
        template = template.replace(f"@{name}@", value)
    return template


class Nginx:
    """A private nginx (the Debian package's binary) on 127.0.0.1:`port` in front of `instances`,
    rendered from scripts/nginx/loraplex-tenant-hash.conf. Its pid file, logs, temp dirs, config,
    front key and the unix sockets of the per-instance blocks all live in `workdir` (mode 0700).
    Clients send `Authorization: Bearer <front key>`; nginx sends each instance its own inference
    token (TorchServe generates its keys at every start and reads none in). `balance` is
    HASH_BY_TENANT (the shipped recipe) or ROUND_ROBIN (the benchmark's comparison)."""

    def __init__(self, workdir: Path, port: int, instances: "list[TorchServe]", *,
                 balance: str = HASH_BY_TENANT) -> None:
        self.workdir = Path(workdir).resolve()
        self.port = port
        self.instances = list(instances)
        self.balance = balance
        self.proc: subprocess.Popen | None = None
        self._guard: Guard | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "nginx.pid"  # written by nginx itself (the `pid` directive): the master's pid

    @property
    def config_path(self) -> Path:
        return self.workdir / "nginx.conf"

    def socket_path(self, i: int) -> Path:
        return self.workdir / "run" / f"ts{i}.sock"

    def front_key(self) -> str:
        return json.loads((self.workdir / "key_file.json").read_text())["inference"]["key"]

    def _ensure_front_key(self) -> None:
        path = self.workdir / "key_file.json"
        if not path.exists():
            import secrets

            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"inference": {"key": secrets.token_urlsafe(24)}}, f)

    def write_config(self) -> Path:
        """Render the config with every instance's current inference token (mode 0600)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        for sub in ("logs", "temp", "run"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self._ensure_front_key()
        for i in range(len(self.instances)):
            if len(str(self.socket_path(i))) > _UNIX_PATH_MAX:
                raise RuntimeError(f"nginx workdir {self.workdir} is too deep for its unix sockets")
        fragment = NGINX_INSTANCE_TEMPLATE.read_text()
        blocks = [_fill(fragment, {"I": str(i), "TS_PORT": str(ts.ports[0]), "TS_DIR": str(ts.workdir),
                                   "SOCK": str(self.socket_path(i)), "TOKEN": ts.keys()["inference"]["key"]})
                  for i, ts in enumerate(self.instances)]
        # As root, nginx's workers would run as `nobody` and could not use the 0700 workdir.
        user = f"user {_user_name()};" if os.geteuid() == 0 else "# workers run as the launching user"
        text = _fill(NGINX_TEMPLATE.read_text(), {
            "USER": user, "PREFIX": str(self.workdir), "PORT": str(self.port), "BALANCE": self.balance,
            "FRONT_KEY": self.front_key(),
            "UPSTREAM_SERVERS": "\n".join(f"        server unix:{self.socket_path(i)};"
                                          for i in range(len(self.instances))),
            "INSTANCE_SERVERS": "\n".join(blocks)})
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return self.config_path

    def command(self) -> list[str]:
        exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if exe is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx; scripts/install.sh does it)")
        return [exe, "-p", f"{self.workdir}/", "-c", str(self.config_path), "-g", "daemon off;"]

    def start(self, detach: bool = False, timeout: float = 15) -> None:
        """Render, start in its own process group, wait until it listens; on failure nothing is left."""
        self.write_config()
        cmd = self.command()
        check = subprocess.run([*cmd[:-2], "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused {self.config_path}: {check.stderr.strip()}")
        with open(self.workdir / "nginx.out", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._guard = None if detach else Guard(self.proc.pid)
            _wait_listening(self.proc, self.port, timeout, lambda: (
                f"nginx did not start on 127.0.0.1:{self.port}:\n"
                f"{_tail(self.workdir / 'logs' / 'error.log')}{_tail(self.workdir / 'nginx.out')}"))
        except BaseException:
            self.stop()
            raise

    def reload(self) -> None:
        """Re-render (e.g. after an instance's token was renewed or it restarted) and reload."""
        self.write_config()
        pid = self.proc.pid if self.proc is not None else int(self.pid_file.read_text().strip())
        import signal

        os.kill(pid, signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                kill_group(self.proc.pid, timeout=10, leader=self.proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        else:
            stop_pid_file(self.pid_file, timeout=10)
        if self._guard is not None:
            self._guard.release()
        self.proc, self._guard = None, None


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


class ScaleOut:
    """`n` private TorchServes of one archive on one Redis and one adapter store, with nginx on
    127.0.0.1:`nginx_port` hashing tenants onto them (`fronts["hash"]`); `add_front` puts another
    nginx (e.g. ROUND_ROBIN) in front of the same instances. The caller owns Redis and the store.
    Instances start at once (threads; each `TorchServe.start` waits for its READY worker);
    `start` leaves nothing running when any part fails; `stop` stops fronts, then instances."""

    def __init__(self, workdir: Path, model_store: Path, n: int, *, env: dict[str, str],
                 nginx_port: int | None = None, extra_config: dict[str, str] | None = None,
                 ts_ports: "list[tuple[int, int, int]] | None" = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.instances = [TorchServe(self.workdir / f"ts{i}", model_store, env=env, extra_config=extra_config,
                                     ports=ts_ports[i] if ts_ports else None) for i in range(n)]
        self.nginx_port = nginx_port
        self.fronts: dict[str, Nginx] = {}

    def start(self, *, detach: bool = False, timeout: float = 300) -> None:
        from concurrent.futures import ThreadPoolExecutor

        try:
            with ThreadPoolExecutor(len(self.instances)) as pool:
                for job in [pool.submit(ts.start, timeout, detach) for ts in self.instances]:
                    job.result()
            self.add_front("hash", HASH_BY_TENANT, self.nginx_port, detach=detach)
        except BaseException:
            self.stop()
            raise

    def restart_instances(self, timeout: float = 300) -> None:
        """Stop and start every instance (cold: empty device slots and host tier, new tokens), then
        restart the fronts with the new tokens (a restart, not `reload`: when it returns, no old
        nginx worker with the old tokens is left to answer). Test stacks only (not detached)."""
        from concurrent.futures import ThreadPoolExecutor

        for front in self.fronts.values():
            front.stop()
        for ts in self.instances:
            ts.stop()
        with ThreadPoolExecutor(len(self.instances)) as pool:
            for job in [pool.submit(ts.start, timeout) for ts in self.instances]:
                job.result()
        for front in self.fronts.values():
            front.start()

    def add_front(self, name: str, balance: str, port: int | None = None, *, detach: bool = False) -> Nginx:
        front = Nginx(self.workdir / f"nginx-{name}", port or free_port(), self.instances, balance=balance)
        front.start(detach=detach)
        self.fronts[name] = front
        return front

    def stop(self) -> None:
        for front in self.fronts.values():
            front.stop()
        for ts in self.instances:
            ts.stop()


# `make scaleout N=3`: the demo archive on the demo's Redis (6399) and store (var/adapters), so
# the shipped model-config.yaml and tenantctl work unchanged; instance i on 8100+10i .. +2.
SCALEOUT_NGINX_PORT = 8090
SCALEOUT_TS_BASE_PORT = 8100


def start_scaleout_demo(var: Path, n: int) -> ScaleOut:
    """Detached: the demo's redis-server (unless it listens), `n` TorchServes, nginx on 8090."""
    redis = RedisServer(DEMO_REDIS_PORT, var / "redis", persistent=True)
    if not wait_port(DEMO_REDIS_PORT, 0.2):
        redis.start(detach=True)
        (var / "redis.pid").write_text(str(redis.proc.pid))
    ports = [tuple(SCALEOUT_TS_BASE_PORT + 10 * i + k for k in range(3)) for i in range(n)]
    busy = [p for trio in ports for p in trio if wait_port(p, 0.05)] + \
        ([SCALEOUT_NGINX_PORT] if wait_port(SCALEOUT_NGINX_PORT, 0.05) else [])
    if busy:
        raise SystemExit(f"ports already in use: {busy} (a scale-out stack running? `make stop`)")
    env = {"LORAPLEX_REDIS_URL": redis.url, "LORAPLEX_ADAPTER_STORE": str(var / "adapters")}
    stack = ScaleOut(var / "scaleout", ROOT / "model_store", n, env=env, nginx_port=SCALEOUT_NGINX_PORT,
                     extra_config={"token_expiration_min": str(DEMO_TOKEN_EXPIRATION_MIN)}, ts_ports=ports)
    stack.start(detach=True)
    return stack


def stop_scaleout_demo(var: Path) -> None:
    root = var / "scaleout"
    if not root.exists():
        return
    for front in sorted(root.glob("nginx-*")):
        stop_pid_file(front / "nginx.pid", timeout=10)
    for ts in sorted(root.glob("ts*")):
        stop_pid_file(ts / "torchserve.pid")
    print("stopped the scale-out stack (nginx, torchserve instances)")
