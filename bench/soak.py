"""Soak (CLI over `loraplex_testing.soak`): a private torchserve + redis-server on
127.0.0.1 (started and stopped here), tenants = 3 x resident capacity, 16 concurrent
clients for --duration seconds. Every answer is checked: status, ``adapter``,
``fallback`` and text against plain PEFT (the prompt alone, greedy), on adapters and
prompts asserted to give pairwise different texts. Transport errors, 4xx and 5xx
count as failures.

    python bench/soak.py --duration 120 --json

The last line is one JSON object: requests, ok, failures (= transport_errors +
errors_4xx + errors_5xx + wrong_adapter + wrong_fallback + wrong_text), evictions,
loads, p50_ms, p99_ms, rss_start_mb, rss_end_mb, ... Exit status 0 when there was no
failure and the worker's RSS after warm-up grew by at most 5%.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="soak a real torchserve with many tenants")
    p.add_argument("--duration", type=float, default=120)
    p.add_argument("--capacity", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from loraplex_testing.soak import soak_own_stack, soak_passed

    with tempfile.TemporaryDirectory(prefix="loraplex-soak-") as tmp:
        result = soak_own_stack(args.duration, workdir=Path(tmp), capacity=args.capacity,
                                concurrency=args.concurrency, seed=args.seed)
    ok = soak_passed(result)
    if not args.json:
        print(f"{'PASS' if ok else 'FAIL'}: {result['requests']} requests, {result['failures']} failures "
              f"({result['transport_errors']} transport, {result['errors_4xx']} 4xx, {result['errors_5xx']} 5xx, "
              f"{result['wrong_adapter']} wrong adapter, {result['wrong_fallback']} wrong fallback, "
              f"{result['wrong_text']} wrong text), {result['evictions']} evictions, p50 {result['p50_ms']} ms, "
              f"p99 {result['p99_ms']} ms, RSS {result['rss_start_mb']} -> {result['rss_end_mb']} MB")
    print(json.dumps({"passed": ok, **result}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
