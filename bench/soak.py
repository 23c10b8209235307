"""Soak: a real torchserve + redis-server on 127.0.0.1 (started and stopped
here), tenants = 3 × resident capacity, 16 concurrent clients for --duration
seconds, every response checked against the tenant's expected output (plain
PEFT, the prompt alone, greedy). Reports 5xx/4xx, wrong outputs, evictions,
latency percentiles and the worker's RSS after warm-up and at the end.

    python bench/soak.py --duration 120 --json

The last line is one JSON object: requests, errors_5xx, errors_4xx,
wrong_outputs, evictions, p50_ms, p99_ms, rss_start_mb, rss_end_mb, ...
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

PROMPTS = ("hello world", "the quick brown fox", "What is the capital", "many tenants on one base")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_soak(duration: float, *, workdir: Path, capacity: int = 4, concurrency: int = 16,
             max_new_tokens: int = 6, warmup_fraction: float = 0.25, seed: int = 0) -> dict:
    from build_archive import build_archive
    from isolation import Oracle
    from loraplex_testing.models import make_random_lora, make_tiny_llama
    from loraplex_testing.services import RedisServer, TorchServe, free_port
    from loraplex_common.config import LoraplexConfig
    from tenant_registry.onboarding import onboard
    from tenant_registry.registry import TenantRegistry
    from tenant_registry.store import AdapterStore
    from tenant_registry.validate import BaseModelSpec

    rng = random.Random(seed)
    model_dir = make_tiny_llama(workdir / "model")
    tenants = {f"soak{i}": make_random_lora(model_dir, workdir / f"a{i}", r=rng.choice([4, 8, 16]),
                                             alpha=16, seed=500 + i) for i in range(3 * capacity)}
    cfg = yaml.safe_load((ROOT / "model-config.yaml").read_text())
    cfg.update({"batchSize": 8, "maxBatchDelay": 10})
    cfg["handler"].update({"num_slots": capacity + 2, "base_model_name": "", "idle_ttl_s": 600})
    (workdir / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    build_archive(model_dir, workdir / "model_store", config_file=workdir / "model-config.yaml")

    redis = RedisServer(free_port(), workdir / "redis")
    redis.start()
    store = workdir / "adapters"
    settings = LoraplexConfig.from_mapping({"redis_url": redis.url, "adapter_store": str(store)})
    registry = TenantRegistry(redis.url, settings.redis_prefix)
    spec = BaseModelSpec.from_model_dir(model_dir)
    for name, path in tenants.items():
        onboard(registry, AdapterStore(store), spec, name, path, settings)
    oracle = Oracle(model_dir, tenants, max_new_tokens)
    expected = {(t, p): oracle.answer(t, p) for t in list(tenants) + [None] for p in PROMPTS}

    ts = TorchServe(workdir / "ts", workdir / "model_store",
                    env={"LORAPLEX_REDIS_URL": redis.url, "LORAPLEX_ADAPTER_STORE": str(store)})
    ts.start(timeout=240)
    key = ts.keys()["inference"]["key"]
    url = f"{ts.inference_url}/predictions/loraplex"
    worker_pid = ts.describe(customized=False)[0]["workers"][0]["pid"]

    lock = threading.Lock()
    stats = {"requests": 0, "errors_5xx": 0, "errors_4xx": 0, "wrong_outputs": 0, "transport_errors": 0}
    latencies: list[float] = []
    wrong_examples: list[dict] = []
    rss_start: list[float] = []
    start = time.monotonic()
    end = start + duration
    warm_at = start + duration * warmup_fraction

    def client(n: int) -> None:
        local = random.Random(seed * 1000 + n)
        session = requests.Session()
        while time.monotonic() < end:
            tenant = local.choice(list(tenants) + [None])
            prompt = local.choice(PROMPTS)
            headers = {"Authorization": f"Bearer {key}"}
            if tenant:
                headers["X-Tenant-ID"] = tenant
            t0 = time.monotonic()
            try:
                r = session.post(url, json={"prompt": prompt, "max_new_tokens": max_new_tokens}, headers=headers,
                                 timeout=60)
            except requests.RequestException:
                with lock:
                    stats["transport_errors"] += 1
                continue
            ms = (time.monotonic() - t0) * 1000
            with lock:
                stats["requests"] += 1
                latencies.append(ms)
                if r.status_code >= 500:
                    stats["errors_5xx"] += 1
                elif r.status_code >= 400:
                    stats["errors_4xx"] += 1
                elif r.json().get("text") != expected[(tenant, prompt)]:
                    stats["wrong_outputs"] += 1
                    if len(wrong_examples) < 3:
                        wrong_examples.append({"tenant": tenant, "prompt": prompt, "got": r.json()})
                if not rss_start and time.monotonic() >= warm_at:
                    rss_start.append(_rss_mb(worker_pid))

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(client, range(concurrency)))
        rss_end = _rss_mb(worker_pid)
        meta = ts.describe()[0]["customizedMetadata"]
        meta = json.loads(meta) if isinstance(meta, str) else meta
    finally:
        ts.stop()
        redis.stop()
    lat = sorted(latencies) or [float("nan")]
    rss0 = rss_start[0] if rss_start else float("nan")
    return {**stats, "duration_s": duration, "tenants": len(tenants), "capacity": capacity,
            "concurrency": concurrency, "evictions": meta["counters"]["evictions_lru"],
            "loads": meta["counters"]["loads"], "engine_calls": meta["counters"].get("engine_calls"),
            "p50_ms": round(statistics.median(lat), 1), "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1),
            "rss_start_mb": round(rss0, 1), "rss_end_mb": round(rss_end, 1),
            "rss_growth_pct": round((rss_end - rss0) / rss0 * 100, 2), "wrong_examples": wrong_examples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="soak a real torchserve with many tenants")
    p.add_argument("--duration", type=float, default=120)
    p.add_argument("--capacity", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="loraplex-soak-") as tmp:
        result = run_soak(args.duration, workdir=Path(tmp), capacity=args.capacity, concurrency=args.concurrency)
    if not args.json:
        print(f"{result['requests']} requests: {result['errors_5xx']} 5xx, {result['errors_4xx']} 4xx, "
              f"{result['wrong_outputs']} wrong, {result['evictions']} evictions, p50 {result['p50_ms']} ms, "
              f"p99 {result['p99_ms']} ms, RSS {result['rss_start_mb']} -> {result['rss_end_mb']} MB")
    print(json.dumps(result))
    ok = result["errors_5xx"] == 0 and result["wrong_outputs"] == 0 and abs(result["rss_growth_pct"]) <= 5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
