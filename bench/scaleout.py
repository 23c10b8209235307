"""Scale-out (CLI over `loraplex_testing.scaleout`): 3 private TorchServes on one
redis-server and one shared adapter store, nginx in front (started and stopped here,
all on 127.0.0.1), a tiny random Llama so it runs on a small CPU box. Tenants = 4 x the
total resident slots, Zipf popularity; the same requests go once through nginx hashing
X-Tenant-ID (scripts/nginx/loraplex-tenant-hash.conf) and once through a round-robin
nginx over the same instances, every answer checked against PEFT.

    python bench/scaleout.py --json

The last line is one JSON object: cold_loads_hash, cold_loads_round_robin (loads that read
the shared store: the adapter was in neither the instance's slots nor its host-memory tier),
their ratio and cut, slot_loads_* and slot_load_cut (every load into a device slot, reloads
from the host tier included), rollout_s (tenantctl onboard of a new version until every instance answers with it),
host_tier_reload_ms / storage_reload_ms, wrong_outputs, errors_5xx, ... Exit status 0 when
nothing failed (no transport error, 4xx, 5xx or wrong output) and every instance rolled
over; the targets (cut >= 0.6, rollout_s <= 2) are reported in `targets`, not enforced.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="tenant-hashing nginx vs round robin over several torchserves")
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--capacity", type=int, default=2, help="resident adapters per instance")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of tenant popularity")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from loraplex_testing.scaleout import run_scaleout

    with tempfile.TemporaryDirectory(prefix="lpx-so-") as tmp:
        r = run_scaleout(Path(tmp), instances=args.instances, capacity=args.capacity, requests=args.requests,
                         zipf_s=args.zipf, concurrency=args.concurrency, seed=args.seed)
    ok = r["failures"] == 0 and r["rollout_s"] is not None
    r["targets"] = {"cold_load_cut_ge_0.6": (r["cold_load_cut"] or 0) >= 0.6,
                    "rollout_s_le_2": r["rollout_s"] is not None and r["rollout_s"] <= 2,
                    "host_tier_5x": (r["host_tier_reload_ms"] is not None
                                     and r["storage_reload_ms"] >= 5 * r["host_tier_reload_ms"])}
    if not args.json:
        print(f"{'PASS' if ok else 'FAIL'}: cold loads hash {r['cold_loads_hash']} vs round robin "
              f"{r['cold_loads_round_robin']} (cut {r['cold_load_cut']}), slot loads {r['slot_loads_hash']} vs "
              f"{r['slot_loads_round_robin']} (cut {r['slot_load_cut']}), rollout {r['rollout_s']} s, "
              f"reload host tier {r['host_tier_reload_ms']} ms vs storage {r['storage_reload_ms']} ms, "
              f"{r['wrong_outputs']} wrong, {r['errors_5xx']} 5xx, {r['wall_s']} s")
    print(json.dumps({"passed": ok, **r}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
