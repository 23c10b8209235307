"""Reload of an evicted adapter: from the host-memory tier vs from the adapter store.

One resident slot and two adapters taken in turn, so every acquire evicts the other and reloads
it: once with the host tier on (every reload after the first two is a host-tier hit) and once with
it off (every reload reads the store and hashes the bytes). The time is the residency's `load_ms`
as describe shows it: from the store, the read and sha256, the engine's parse and copy (with B's
transpose) into the slot and, with the tier on, the slot image it keeps; from the tier, the image's
contiguous copies into the slot (an engine without images: the held bytes, copied as from the
store). The load average (1 min) at the start and end of the run is printed with the figures. No
Redis and no TorchServe: the residency, the store (a local directory, so its reads come from the
page cache after the first) and the multilora engine, on a base model with Llama-1B-wide layers
(`--layers` of them) and rank-`--rank` adapters on all seven projections.

    python bench/host_tier_reload.py --json [--device cuda] [--rounds 20]

Figures: README.md, "Host-memory tier, pinning and prefetch".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from handler.engine import EngineSettings, make_engine
from handler.host_tier import HostTier
from handler.model_loading import eos_token_ids, load_base_model
from handler.residency import AdapterResidency
from loraplex_common.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from loraplex_testing.models import make_random_lora, make_tiny_llama
from tenant_registry.schema import TenantRecord
from tenant_registry.store import AdapterStore


def _record(store_root: Path, tenant: str, adapter_dir: Path, rank: int, alpha: int) -> TenantRecord:
    dest = store_root / tenant / "v1"
    dest.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(adapter_dir / name, dest / name)
    weights = (dest / WEIGHTS_FILE).read_bytes()
    now = time.time()
    return TenantRecord(tenant_id=tenant, adapter_id=f"{tenant}@v1", version=1, path=f"{tenant}/v1",
                        sha256=hashlib.sha256(weights).hexdigest(), rank=rank, alpha=float(alpha), use_rslora=False,
                        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                        base_model="", status="enabled", created_at=now, updated_at=now, nbytes=len(weights))


def _reloads(model_dir: Path, store: AdapterStore, records: list[TenantRecord], *, device: str, tier_mb: int,
             rounds: int, rank: int) -> tuple[list[float], list[str]]:
    model, tokenizer = load_base_model(model_dir, device=device, dtype="auto")
    engine = make_engine("multilora", model, EngineSettings(num_slots=3, max_rank=rank),
                         eos_token_ids=eos_token_ids(model, tokenizer), pad_token_id=int(tokenizer.pad_token_id))
    on_cuda = str(engine.get_model_status().get("device", "cpu")).startswith("cuda")
    residency = AdapterResidency(engine, read=store.read, max_resident=1, idle_ttl_s=0, negative_cache_s=30,
                                 host_tier=HostTier(tier_mb << 20, pin=on_cuda))
    times, sources = [], []
    for i in range(rounds * len(records)):
        with residency.batch() as lease:
            lease.acquire(records[i % len(records)])
        if on_cuda:
            import torch
            torch.cuda.synchronize()
        last = residency.last_acquire
        if i >= len(records):  # the first load of each is a store read in both runs
            times.append(last.load_ms)
            sources.append(last.source)
    return times, sources


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="loraplex-tier-bench-") as tmp:
        root = Path(tmp)
        model_dir = make_tiny_llama(root / "base", hidden=2048, layers=args.layers, heads=16, kv_heads=4,
                                    intermediate=8192)
        store = AdapterStore(root / "store")
        records = [_record(store.root, f"t{i}", make_random_lora(model_dir, root / f"a{i}", r=args.rank,
                                                                 alpha=args.rank, seed=i), args.rank, args.rank)
                   for i in range(2)]
        host, host_src = _reloads(model_dir, store, records, device=args.device, tier_mb=4096, rounds=args.rounds,
                                  rank=args.rank)
        disk, disk_src = _reloads(model_dir, store, records, device=args.device, tier_mb=0, rounds=args.rounds,
                                  rank=args.rank)
    assert set(host_src) == {"host"} and set(disk_src) == {"store"}, (host_src, disk_src)
    out = {"device": args.device, "adapter_bytes": records[0].nbytes, "reloads": len(host),
           "host_tier_reload_ms": round(statistics.median(host), 2),
           "storage_reload_ms": round(statistics.median(disk), 2),
           "host_tier_reload_ms_min_max": [round(min(host), 2), round(max(host), 2)],
           "storage_reload_ms_min_max": [round(min(disk), 2), round(max(disk), 2)],
           "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    out["speedup"] = round(out["storage_reload_ms"] / out["host_tier_reload_ms"], 2)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
