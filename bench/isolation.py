"""Tenant isolation property check (CLI over `loraplex_testing.isolation`).

Randomized mixed-tenant batches, base rows included; every row is compared with its
prompt run alone with its tenant's adapter in plain PEFT: teacher-forced tokens, the
engine's per-step logits (eager decoding) and full-sequence logits through the
multi-LoRA facade, on adapters and prompts asserted to differ pairwise.

    python bench/isolation.py --trials 1000 --json                      # worker request path (redis-server)
    python bench/isolation.py --path engine --decode static --trials 200 --json
    python bench/isolation.py --device cuda --decode graphs --trials 20 --json   # GPU: captured graphs

``--path service`` (the default on a CPU) runs `LoraplexService` on a private
redis-server (6 tenants, 2 resident); ``--path engine`` (the default with
``--device cuda``) drives an engine directly, loading/deleting adapters between batches
(6 adapters, 3 slots) so slots are refilled by other tenants between graph replays;
there ``--static-slots`` (on by default with graphs) also runs each batch's facade
check reading its slots from one persistent tensor (`MultiLoraModel.static_batch`).
The last line is one JSON object (`trials`, `rows`, `failures`, `examples`, ...);
exit status 0 when no row failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="randomized mixed-tenant isolation check against PEFT")
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", choices=["auto", "service", "engine"], default="auto",
                   help="auto: service on a CPU, engine with --device cuda")
    p.add_argument("--engine", choices=["multilora", "peft"], default="multilora")
    p.add_argument("--decode", choices=["auto", "generate", "static", "graphs"], default="auto")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--static-slots", choices=["auto", "on", "off"], default="auto",
                   help="engine path: facade check through static_batch (auto: on with graphs)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cpu" and args.static_slots == "on":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # static_batch's Triton kernels, in the interpreter
    import torch

    torch.set_num_threads(1)  # tiny model: one thread is fastest and steadiest
    from loraplex_testing.isolation import TOL, build_setup, engine_for, run_engine_trials, run_service_trials
    from loraplex_testing.services import redis_server

    path = args.path if args.path != "auto" else ("engine" if args.device == "cuda" else "service")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="loraplex-iso-") as tmp:
        setup = build_setup(Path(tmp), seed=args.seed)
        if path == "service":
            if args.device != "cpu":
                p.error("--path service runs the worker's own device choice; use --path engine with --device")
            with redis_server() as (url, _):
                result = run_service_trials(args.trials, redis_url=url, workdir=Path(tmp), seed=args.seed,
                                            engine=args.engine, decode=args.decode, setup=setup).as_dict()
        else:
            decode = args.decode if args.decode != "auto" else ("graphs" if args.device == "cuda" else "generate")
            static = args.static_slots == "on" or (args.static_slots == "auto" and decode == "graphs")
            engine = engine_for(setup, kind=args.engine, decode=decode, device=args.device, capacity=3)
            res = run_engine_trials(engine, setup, args.trials, seed=args.seed, capacity=3, tol=TOL,
                                    score_steps=decode != "graphs", static_slots=static,
                                    facade_check=args.engine == "multilora")
            status = engine.get_model_status()
            result = {**res.as_dict(), "path": "engine", "engine": args.engine, "decode": decode,
                      "device": args.device, "static_slots": static, "decoder": status.get("decoder"),
                      **setup.describe()}
    result["seconds"] = round(time.time() - start, 1)
    ok = result["failures"] == 0 and result["rows"] > 0
    if decode_used_graphs(result):
        dec = result["decoder"]
        ok = ok and dec.get("captures", 0) > 0 and dec.get("fallbacks", 0) == 0
    if not args.json:
        print(f"{'PASS' if ok else 'FAIL'}: {result['trials']} trials, {result['rows']} rows, "
              f"{result['failures']} failed, {result['loads']} loads, {result['evictions']} evictions, "
              f"max rel_err {result['max_rel_err']} in {result['seconds']} s")
    print(json.dumps({"passed": ok, **result}))
    return 0 if ok else 1


def decode_used_graphs(result: dict) -> bool:
    return result.get("decode") == "graphs" and isinstance(result.get("decoder"), dict)


if __name__ == "__main__":
    sys.exit(main())
