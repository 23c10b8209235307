"""The scale-out measurement: several real TorchServes on one Redis and one adapter store,
nginx in front (`services.ScaleOut`), the same Zipf workload sent once through the
tenant-hashing nginx and once through a round-robin nginx, every answer checked.

What it reports (`run_scaleout`; CLI: bench/scaleout.py; a short run is
tests/e2e/test_scaleout_short.py):

- per routing, summed over instances and counted over the phase (describe, `GET
  /models/loraplex?customized=true`, each instance's management token): cold loads = loads
  of an adapter the instance held in neither its device slots nor its host-memory tier, so
  read from the shared store and hashed (`host_misses`; the cache textbook's compulsory
  misses: an instance's first use of an adapter, plus what the tier had to drop); slot loads
  = every load into a device slot (the residency's `loads`), the cold ones and the reloads
  from the host tier (a copy from host memory). Without a host tier (no `host_misses`
  counter) every slot load is cold. Each phase starts on freshly started instances
  (nothing in a slot or in the host-memory tier), so both start equally cold;
- where each tenant went (nginx's access log: the upstream socket per request);
- `rollout_s`: after `tenantctl onboard` of a new version of a tenant every instance had
  served (cached), the time until each instance, polled directly, answers with it;
- the reload of an evicted adapter: `load_ms` of its first load and of its reload, with
  the describe's load `source` where the worker reports one (host-memory tier);
- failures: transport errors, 4xx, 5xx, and answers whose `adapter`, `fallback` or text
  is not PEFT's for that tenant's prompt alone (`isolation.reply_failures`, on adapters and
  prompts asserted pairwise different).

Concurrency: `concurrency` client threads per phase share the counters under one lock;
the oracle's texts are computed before any client starts (PEFT is not thread-safe).
"""
from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .isolation import IsolationSetup, build_setup, capacity_setting, reply_failures

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "scaleout"
_UPSTREAM = re.compile(r'tenant="([^"]*)" upstream=\S*?ts(\d+)\.sock')


@dataclass
class PhaseStats:
    requests: int = 0
    ok: int = 0
    transport_errors: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    wrong: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    def record(self, kind: str, example: dict) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 5:
            self.examples.append({"kind": kind, **example})

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms) or [float("nan")]
        return {"requests": self.requests, "ok": self.ok, "transport_errors": self.transport_errors,
                "errors_4xx": self.errors_4xx, "errors_5xx": self.errors_5xx, "wrong_outputs": self.wrong,
                "p50_ms": round(statistics.median(lat), 1),
                "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1), "examples": self.examples}


def zipf_workload(tenants: Sequence[str], prompts: Sequence[str], n: int, s: float, seed: int) -> list[tuple[str, str]]:
    """`n` (tenant, prompt) pairs; tenant k of `tenants` drawn with weight 1/(k+1)^s."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(len(tenants))]
    return [(t, rng.choice(prompts)) for t in rng.choices(list(tenants), weights, k=n)]


def _describe(ts: Any) -> dict:
    meta = ts.describe()[0]["customizedMetadata"]
    return json.loads(meta) if isinstance(meta, str) else meta


def load_counts(instances: Sequence[Any]) -> tuple[int, int]:
    """(slot loads, cold loads = loads read from the store) summed over instances; without a
    host-memory tier (no `host_misses` counter) every slot load is a store read."""
    counters = [_describe(ts)["counters"] for ts in instances]
    slot = sum(c["loads"] for c in counters)
    if any("host_misses" not in c for c in counters):
        return slot, slot
    return slot, sum(c["host_misses"] for c in counters)


def _post(session: Any, url: str, token: str, tenant: str | None, prompt: str, n_new: int, timeout: float):
    headers = {"Authorization": f"Bearer {token}"}
    if tenant:
        headers["X-Tenant-ID"] = tenant
    return session.post(url, json={"prompt": prompt, "max_new_tokens": n_new}, headers=headers, timeout=timeout)


def _body(r: Any) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


def drive(url: str, token: str, work: Sequence[tuple[str, str]], expected: dict, n_new: int, *,
          concurrency: int, timeout: float = 120) -> PhaseStats:
    """Send `work` through `url` from `concurrency` threads, checking every answer."""
    import requests

    stats, lock, queue = PhaseStats(), threading.Lock(), list(reversed(work))

    def client(_n: int) -> None:
        session = requests.Session()
        while True:
            with lock:
                if not queue:
                    return
                tenant, prompt = queue.pop()
            t0 = time.monotonic()
            try:
                r = _post(session, url, token, tenant, prompt, n_new, timeout)
            except requests.RequestException as exc:
                with lock:
                    stats.requests += 1
                    stats.record("transport_errors", {"tenant": tenant, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            ms = (time.monotonic() - t0) * 1000
            body = _body(r)
            with lock:
                stats.requests += 1
                stats.latencies_ms.append(ms)
                where = {"tenant": tenant, "prompt": prompt, "status": r.status_code, "got": body}
                if r.status_code >= 500:
                    stats.record("errors_5xx", where)
                elif r.status_code >= 400:
                    stats.record("errors_4xx", where)
                elif fails := reply_failures(r.status_code, body, tenant, expected[(tenant, prompt)]):
                    stats.record("wrong", {**where, "why": fails})
                else:
                    stats.ok += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return stats


def routes(access_log: Path, skip_lines: int) -> dict[str, set[int]]:
    """tenant -> the instances nginx sent its requests to (access log lines after `skip_lines`)."""
    seen: dict[str, set[int]] = {}
    for line in access_log.read_text().splitlines()[skip_lines:]:
        if m := _UPSTREAM.search(line):
            seen.setdefault(m.group(1), set()).add(int(m.group(2)))
    return seen


def _log_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def measure_rollout(instances: Sequence[Any], tenantctl: list[str], tenant: str, adapter_dir: Path, prompt: str,
                    want_text: str, n_new: int, timeout: float = 30) -> dict:
    """Onboard the next version of `tenant` with the real `tenantctl` once every instance has
    served its current one; poll each instance directly until it answers with the new one."""
    import requests

    def ask(ts: Any) -> dict:
        r = _post(requests, f"{ts.inference_url}/predictions/{ts.model_name}", ts.keys()["inference"]["key"],
                  tenant, prompt, n_new, 60)
        return {"status": r.status_code, **(b if isinstance(b := _body(r), dict) else {"text": b})}

    before = [ask(ts) for ts in instances]  # every worker now holds the current record in its cache
    old = {b.get("adapter") for b in before}
    t_cli = time.monotonic()
    done = subprocess.run([*tenantctl, "onboard", tenant, str(adapter_dir)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "LORAPLEX_REDIS_PREFIX": PREFIX})
    t0 = time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"tenantctl onboard failed ({done.returncode}): {done.stderr.strip()}")
    new = json.loads(done.stdout)["adapter_id"]
    wrong: list[dict] = []

    def poll(ts: Any) -> float | None:
        while time.monotonic() - t0 < timeout:
            got = ask(ts)
            if got.get("status") != 200 or got.get("text") != want_text or got.get("adapter") not in {new, *old}:
                wrong.append(got)
            if got.get("adapter") == new:
                return time.monotonic() - t0
            time.sleep(0.02)
        return None

    with ThreadPoolExecutor(len(instances)) as pool:
        seen = list(pool.map(poll, instances))
    return {"rollout_s": None if None in seen else round(max(seen), 3),
            "rollout_per_instance_s": [None if s is None else round(s, 3) for s in seen],
            "onboard_cli_s": round(t0 - t_cli, 3), "rollout_from": sorted(o for o in old if o), "rollout_to": new,
            "rollout_wrong": len(wrong), "rollout_wrong_examples": wrong[:3]}


def measure_reload(ts: Any, tenant: str, others: Sequence[str], prompt: str, n_new: int, reps: int = 3) -> dict:
    """On one instance: load `tenant` (never served there before: from the store), then `reps`
    times evict it by asking `others` (the resident capacity) and ask it again; each load's
    `load_ms` (and `source`, where the worker reports one) read from describe."""
    import requests

    url, token = f"{ts.inference_url}/predictions/{ts.model_name}", ts.keys()["inference"]["key"]

    def load(t: str) -> dict:
        _post(requests, url, token, t, prompt, n_new, 60).raise_for_status()
        return next(a for a in _describe(ts)["resident"] if a["tenant"] == t)

    first = load(tenant)
    reloads = []
    for _ in range(reps):
        for t in others:
            load(t)
        reloads.append(load(tenant))

    def from_host(a: dict) -> bool:
        return "host" in str(a.get("source", "")).lower()

    host = [a["load_ms"] for a in reloads if from_host(a)]
    store = [first["load_ms"]] + [a["load_ms"] for a in reloads if not from_host(a)]
    sources = sorted({str(a["source"]) for a in [first, *reloads] if "source" in a})
    if not sources:
        reason = "the describe output has no load `source` (the host-memory tier is not in this build)"
    elif not host:
        reason = f"no reload came from the host-memory tier (sources seen: {sources})"
    else:
        reason = None
    return {"host_tier_reload_ms": round(statistics.median(host), 3) if host else None,
            "storage_reload_ms": round(statistics.median(store), 3),
            "host_tier_reason": reason, "reload_sources": sources,
            "reload_load_ms": [first["load_ms"], *(a["load_ms"] for a in reloads)]}


def run_scaleout(workdir: Path, *, instances: int = 3, capacity: int = 2, requests: int = 500, zipf_s: float = 1.2,
                 concurrency: int = 6, prompts: int = 3, max_new_tokens: int = 6, seed: int = 0,
                 start_timeout: float = 300) -> dict:
    """Start Redis + `instances` TorchServes (`capacity` resident adapters each) + two nginx
    fronts, run both phases, the reload and the rollout, stop everything; the JSON report."""
    import yaml

    from .archive import build_archive, with_batching
    from .services import ROUND_ROBIN, RedisServer, ScaleOut, free_port
    from .soak import onboard_all

    t_start = time.monotonic()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    slots = instances * capacity
    n_tenants = 4 * slots
    setup: IsolationSetup = build_setup(workdir / "setup", tenants=n_tenants + capacity + 1, prompts=prompts,
                                        max_new_tokens=max_new_tokens, seed=seed, prefix="s", candidates=200)
    names = list(setup.adapters)
    # the workload's tenants; tenants that only evict in the reload measurement; one only it reloads
    tenants, evictors, reloaded = names[:n_tenants], names[n_tenants:-1], names[-1]
    expected = {(t, p): setup.oracle.text(t, p, max_new_tokens) for t in names for p in setup.prompts}
    cfg = yaml.safe_load((ROOT / "model-config.yaml").read_text())
    cfg = with_batching(cfg, 4, 20)  # TorchServe batches only a synchronous (static) worker
    cfg["handler"].update({**capacity_setting(capacity), "base_model_name": "", "idle_ttl_s": 3600,
                           "registry_cache_s": 30})
    (workdir / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    build_archive(setup.model_dir, workdir / "model_store", config_file=workdir / "model-config.yaml")
    store = workdir / "adapters"
    redis = RedisServer(free_port(), workdir / "redis")
    redis.start()
    stack = None
    try:
        onboard_all(setup, redis_url=redis.url, redis_prefix=PREFIX, store=store)
        env = {"LORAPLEX_REDIS_URL": redis.url, "LORAPLEX_ADAPTER_STORE": str(store.resolve()),
               "LORAPLEX_REDIS_PREFIX": PREFIX, "OMP_NUM_THREADS": "1"}
        stack = ScaleOut(workdir / "stack", workdir / "model_store", instances, env=env)
        stack.start(timeout=start_timeout)
        t_ready = time.monotonic()
        stack.add_front("round_robin", ROUND_ROBIN)
        work = zipf_workload(tenants, setup.prompts, requests, zipf_s, seed)
        phases: dict[str, dict] = {}
        for name in ("hash", "round_robin"):
            front = stack.fronts[name]
            if phases:  # every phase starts on fresh instances: no adapter in a slot or in the host tier
                stack.restart_instances(start_timeout)
            log = front.workdir / "logs" / "access.log"
            skip, (slot0, cold0) = _log_lines(log), load_counts(stack.instances)
            t0 = time.monotonic()
            stats = drive(f"{front.url}/predictions/loraplex", front.front_key(), work, expected, max_new_tokens,
                          concurrency=concurrency)
            slot1, cold1 = load_counts(stack.instances)
            phases[name] = {**stats.summary(), "cold_loads": cold1 - cold0, "slot_loads": slot1 - slot0,
                            "wall_s": round(time.monotonic() - t0, 1), "routes": routes(log, skip)}
        hash_routes, rr_routes = phases["hash"].pop("routes"), phases["round_robin"].pop("routes")
        reload = measure_reload(stack.instances[0], reloaded, evictors, setup.prompts[0], max_new_tokens)
        exe = Path(sys.executable).parent / "tenantctl"
        tenantctl = [str(exe), "--json", "--model-config", str(workdir / "model-config.yaml"), "--redis-url",
                     redis.url, "--store", str(store.resolve()), "--base-model-dir", str(setup.model_dir)]
        rollout_tenant = tenants[0]
        rollout = measure_rollout(stack.instances, tenantctl, rollout_tenant, setup.adapters[rollout_tenant],
                                  setup.prompts[0], expected[(rollout_tenant, setup.prompts[0])], max_new_tokens)
    finally:
        if stack is not None:
            stack.stop()
        redis.stop()
    hash_loads, rr_loads = phases["hash"]["cold_loads"], phases["round_robin"]["cold_loads"]
    hash_slot, rr_slot = phases["hash"]["slot_loads"], phases["round_robin"]["slot_loads"]
    return {
        "instances": instances, "resident_slots_total": slots, "tenants": n_tenants, "requests": requests,
        "zipf_s": zipf_s, "concurrency": concurrency, "max_new_tokens": max_new_tokens,
        "cold_loads_hash": hash_loads, "cold_loads_round_robin": rr_loads,
        "cold_loads_ratio": round(hash_loads / rr_loads, 3) if rr_loads else None,
        "cold_load_cut": round(1 - hash_loads / rr_loads, 3) if rr_loads else None,
        # every load into a device slot: the cold ones and the reloads from the host-memory tier
        "slot_loads_hash": hash_slot, "slot_loads_round_robin": rr_slot,
        "slot_load_cut": round(1 - hash_slot / rr_slot, 3) if rr_slot else None,
        "hash_tenants_on_one_instance": sum(len(v) == 1 for v in hash_routes.values()),
        "hash_tenants_seen": len(hash_routes),
        "hash_tenants_per_instance": [sum(i in v for v in hash_routes.values()) for i in range(instances)],
        "round_robin_tenants_on_one_instance": sum(len(v) == 1 for v in rr_routes.values()),
        **rollout, **reload,
        "wrong_outputs": phases["hash"]["wrong_outputs"] + phases["round_robin"]["wrong_outputs"]
        + rollout["rollout_wrong"],
        "errors_5xx": phases["hash"]["errors_5xx"] + phases["round_robin"]["errors_5xx"],
        "failures": sum(phases[p][k] for p in phases for k in ("transport_errors", "errors_4xx", "errors_5xx",
                                                                "wrong_outputs")) + rollout["rollout_wrong"],
        "phases": phases, "startup_s": round(t_ready - t_start, 1), "wall_s": round(time.monotonic() - t_start, 1),
        **setup.describe(),
    }
