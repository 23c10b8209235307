"""The soak driver: many concurrent clients against a real TorchServe for a while, every
answer checked.

What counts as a failure (any one fails the soak): a transport error (connection
refused/reset, timeout), any 4xx or 5xx, a reply whose ``adapter`` is not the
tenant's ``<tenant>@v1`` (``base`` for requests without a tenant), whose ``fallback``
is not None (``no_tenant`` without a tenant), or whose text is not PEFT's greedy text
for that prompt alone; and a worker restart (its pid changed by the end: TorchServe's
frontend restarts a worker it gave up on). The tenants' adapters and the prompts come from
`isolation.build_setup`, which asserts that every two tenants (and the base model)
give different texts on every prompt, so a reply served with another tenant's
adapter cannot pass the text check.

`run_soak(target, setup, ...)` drives any server (`SoakTarget`: URL, token, describe);
`soak_own_stack` starts a private redis-server + TorchServe for it (`bench/soak.py`);
tests/e2e/test_soak_short.py drives the shared e2e stack.

Concurrency: `concurrency` client threads share the counters under one lock; the
oracle's texts are computed before the clients start (PEFT is not thread-safe).
"""
from __future__ import annotations

import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .isolation import IsolationSetup, build_setup, reply_failures

ROOT = Path(__file__).resolve().parent.parent
FAILURE_KEYS = ("transport_errors", "errors_4xx", "errors_5xx", "wrong_adapter", "wrong_fallback", "wrong_text",
                "worker_restarts")


@dataclass
class SoakTarget:
    """Where the soak sends requests: ``POST {url}`` with the inference token."""

    url: str
    token: str
    describe: Callable[[], dict]  # the worker's customized describe (counters)
    worker_pid: int | None = None
    current_pid: Callable[[], int | None] = lambda: None  # the worker's pid now (a restart changes it)


def rss_mb(pid: int | None) -> float:
    """The process's resident memory in MB; NaN without a pid or when the process is gone."""
    if pid is None:
        return float("nan")
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def target_for(ts: Any) -> SoakTarget:
    """A `SoakTarget` for a running `services.TorchServe`."""

    def describe() -> dict:
        meta = ts.describe()[0]["customizedMetadata"]
        return json.loads(meta) if isinstance(meta, str) else meta

    def current_pid() -> int | None:
        return ts.describe(customized=False)[0]["workers"][0]["pid"]

    return SoakTarget(f"{ts.inference_url}/predictions/{ts.model_name}", ts.keys()["inference"]["key"], describe,
                      current_pid(), current_pid)


def run_soak(target: SoakTarget, setup: IsolationSetup, duration: float, *, tenants: Sequence[str] | None = None,
             concurrency: int = 16, warmup_fraction: float = 0.25, seed: int = 0,
             timeout: float = 60) -> dict:
    """`concurrency` clients for `duration` seconds, each asking a random tenant of
    `tenants` (default: every adapter of `setup`, onboarded under its own name) or no
    tenant a random prompt of `setup`; every answer checked (module docstring). Returns
    the counts (`failures` = their sum), latency percentiles, eviction/load deltas and
    the worker's RSS after warm-up and at the end."""
    import requests

    names = list(tenants if tenants is not None else setup.adapters)
    n_new = setup.max_new_tokens
    expected = {(t, p): setup.oracle.text(t, p, n_new) for t in [*names, None] for p in setup.prompts}
    lock = threading.Lock()
    stats = {"requests": 0, "ok": 0, **{k: 0 for k in FAILURE_KEYS}}
    latencies: list[float] = []
    examples: list[dict] = []
    rss_start: list[float] = []
    before = target.describe()["counters"]
    start = time.monotonic()
    end = start + duration
    warm_at = start + duration * warmup_fraction

    def record(kind: str, example: dict) -> None:
        stats[kind] += 1
        if len(examples) < 5:
            examples.append({"kind": kind, **example})

    def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        session = requests.Session()
        while time.monotonic() < end:
            tenant = rng.choice([*names, None])
            prompt = rng.choice(setup.prompts)
            headers = {"Authorization": f"Bearer {target.token}"}
            if tenant:
                headers["X-Tenant-ID"] = tenant
            t0 = time.monotonic()
            try:
                r = session.post(target.url, json={"prompt": prompt, "max_new_tokens": n_new}, headers=headers,
                                 timeout=timeout)
            except requests.RequestException as exc:
                with lock:
                    stats["requests"] += 1
                    record("transport_errors", {"tenant": tenant, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            ms = (time.monotonic() - t0) * 1000
            try:
                body = r.json()  # TorchServe does not always label the worker's JSON as such
            except ValueError:
                body = r.text  # not JSON: fails every check below
            with lock:
                stats["requests"] += 1
                latencies.append(ms)
                where = {"tenant": tenant, "prompt": prompt, "status": r.status_code, "got": body}
                if r.status_code >= 500:
                    record("errors_5xx", where)
                elif r.status_code >= 400:
                    record("errors_4xx", where)
                else:
                    fails = reply_failures(r.status_code, body, tenant, expected[(tenant, prompt)])
                    kinds = [k for k, word in (("wrong_adapter", "adapter"), ("wrong_fallback", "fallback"),
                                               ("wrong_text", "text")) if any(f.startswith(word) for f in fails)]
                    for kind in kinds or (["wrong_text"] if fails else []):
                        record(kind, {**where, "why": fails})
                    if not fails:
                        stats["ok"] += 1
                if not rss_start and time.monotonic() >= warm_at:
                    rss_start.append(rss_mb(target.worker_pid))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    rss_end = rss_mb(target.worker_pid)
    now_pid = target.current_pid()
    if target.worker_pid is not None and now_pid is not None and now_pid != target.worker_pid:
        record("worker_restarts", {"pid_before": target.worker_pid, "pid_after": now_pid,
                                   "why": "TorchServe restarted the worker; see its ts_log.log"})
    after = target.describe()["counters"]
    lat = sorted(latencies) or [float("nan")]
    rss0 = rss_start[0] if rss_start else float("nan")
    failures = sum(stats[k] for k in FAILURE_KEYS)
    return {**stats, "failures": failures, "duration_s": duration, "tenants": len(names),
            "concurrency": concurrency, "evictions": after["evictions_lru"] - before["evictions_lru"],
            "loads": after["loads"] - before["loads"],
            "engine_calls": (after.get("engine_calls") or 0) - (before.get("engine_calls") or 0),
            "p50_ms": round(statistics.median(lat), 1), "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1),
            "rss_start_mb": round(rss0, 1), "rss_end_mb": round(rss_end, 1),
            "rss_growth_pct": round((rss_end - rss0) / rss0 * 100, 2), "examples": examples, **setup.describe()}


def onboard_all(setup: IsolationSetup, *, redis_url: str, redis_prefix: str, store: Path) -> None:
    """Onboard every adapter of `setup` as the tenant of the same name, the way `tenantctl onboard` does."""
    from loraplex_common.config import LoraplexConfig
    from tenant_registry.onboarding import onboard
    from tenant_registry.registry import TenantRegistry
    from tenant_registry.store import AdapterStore
    from tenant_registry.validate import BaseModelSpec

    settings = LoraplexConfig.from_mapping({"redis_url": redis_url, "redis_prefix": redis_prefix,
                                            "adapter_store": str(store)})
    registry = TenantRegistry(redis_url, redis_prefix)
    spec = BaseModelSpec.from_model_dir(setup.model_dir)
    for name, path in setup.adapters.items():
        onboard(registry, AdapterStore(Path(store)), spec, name, path, settings)


def soak_own_stack(duration: float, *, workdir: Path, capacity: int = 4, concurrency: int = 16,
                   max_new_tokens: int = 6, seed: int = 0) -> dict:
    """Start a private redis-server + TorchServe (capacity resident adapters, tenants =
    3 x capacity), soak it, stop both."""
    import yaml

    from .archive import build_archive, with_batching
    from .isolation import capacity_setting
    from .services import RedisServer, TorchServe, free_port

    workdir = Path(workdir)
    setup = build_setup(workdir / "setup", tenants=3 * capacity, prompts=6, max_new_tokens=max_new_tokens,
                        seed=seed, prefix="soak")
    cfg = yaml.safe_load((ROOT / "model-config.yaml").read_text())
    cfg = with_batching(cfg, 8, 10)  # TorchServe batches only a synchronous (static) worker
    cfg["handler"].update({**capacity_setting(capacity), "base_model_name": "", "idle_ttl_s": 600})
    (workdir / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    build_archive(setup.model_dir, workdir / "model_store", config_file=workdir / "model-config.yaml")
    redis = RedisServer(free_port(), workdir / "redis")
    redis.start()
    store = workdir / "adapters"
    ts = None
    try:
        onboard_all(setup, redis_url=redis.url, redis_prefix="loraplex", store=store)
        ts = TorchServe(workdir / "ts", workdir / "model_store",
                        env={"LORAPLEX_REDIS_URL": redis.url, "LORAPLEX_ADAPTER_STORE": str(store),
                             "LORAPLEX_REDIS_PREFIX": "loraplex"})
        ts.start(timeout=240)
        result = run_soak(target_for(ts), setup, duration, concurrency=concurrency, seed=seed)
    finally:
        if ts is not None:
            ts.stop()
        redis.stop()
    return {**result, "capacity": capacity}


def soak_passed(result: dict, *, max_rss_growth_pct: float = 5.0) -> bool:
    """No failure of any kind, some traffic, and the worker's RSS flat within the bound."""
    return (result["requests"] > 0 and result["failures"] == 0
            and abs(result["rss_growth_pct"]) <= max_rss_growth_pct)
