"""Where a graph-replayed decode step's time goes, per kernel, for the pure base model and
ours (the group launch variants), with a Chrome trace per variant for the timeline.

Why: `engine_bench.py` gives one decode ratio per scenario; in a captured step
LoRA costs the latency of a few small kernels, so what matters is which of them
sit on the critical path, and how long each takes. Adapters are random values
written straight into the slots (no files), rank 16 on all seven projections,
like the bench.

    PYTHONPATH=. python3 bench/profile_decode_step.py --size 1b --out /tmp/traces
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_bench import TARGETS, build_base, clone_sharing_params  # noqa: E402
from handler.engine.multilora import MultiLoraModel  # noqa: E402
from handler.engine.static_decode import StaticDecoder  # noqa: E402

VARIANTS = {"nogroups": dict(group_decode=False, group_prefill=False), "groups": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scenarios", default="single,mixed_all")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None, help="folder for Chrome traces (one per variant/scenario)")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    base = build_base(args.size, dt, dev)
    B = args.batch
    ids = torch.randint(1, 32000, (B, args.prompt_len), device=dev)
    mask = torch.ones_like(ids)
    scen = {"single": ["a0"] * B, "mixed4": [f"a{i % 4}" for i in range(B)], "mixed_all": [f"a{i}" for i in range(B)]}
    runs = {"base": (StaticDecoder(clone_sharing_params(base), use_graphs=True), None)}
    g = torch.Generator(device=dev).manual_seed(0)
    for v in args.variants.split(","):
        ml = MultiLoraModel(clone_sharing_params(base), max_adapters=B, max_rank=64, target_modules=TARGETS,
                            **VARIANTS[v])
        for slot in range(1, B + 1):
            for layer in ml.lora_layers.values():
                a = torch.randn(args.rank, layer.in_features, device=dev, dtype=dt, generator=g) * 0.02
                b = torch.randn(layer.out_features, args.rank, device=dev, dtype=dt, generator=g) * 0.02
                layer.write_slot(slot, a, b, 2.0)
        ml._slots = {f"a{i}": i + 1 for i in range(B)}  # names for adapter_names (bench only)
        for sc in args.scenarios.split(","):
            runs[f"{v}/{sc}"] = (StaticDecoder(ml.model, use_graphs=True, lora=ml), scen[sc])

    def gen(dec, names, new):
        with torch.inference_mode():
            return dec.generate(ids, mask, names or [None] * B, max_new_tokens=new, do_sample=False,
                                eos_token_id=[], pad_token_id=0)

    def timed(fn) -> float:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e)

    for dec, names in runs.values():  # capture + JIT
        gen(dec, names, 3)
    step = {k: [] for k in runs}
    for _ in range(5):  # interleaved rounds; decode per step = (full - one token) / (new - 1)
        for k, (dec, names) in runs.items():
            one = timed(lambda: gen(dec, names, 1))
            full = timed(lambda: gen(dec, names, args.new_tokens))
            step[k].append((full - one) / (args.new_tokens - 1))
    med = {k: statistics.median(v) for k, v in step.items()}
    print("decode ms/step:", {k: round(v, 4) for k, v in med.items()})
    print("lora us/step over base:", {k: round((v - med["base"]) * 1000, 1) for k, v in med.items()})

    from torch.profiler import ProfilerActivity, profile

    for k, (dec, names) in runs.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen(dec, names, 9)
            torch.cuda.synchronize()
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(args.out) / f"{k.replace('/', '_')}.json"))
        rows = {}
        for ev in prof.events():
            if ev.device_type.name == "CUDA":
                key = ev.name[:80]
                n, t = rows.get(key, (0, 0.0))
                rows[key] = (n + 1, t + ev.device_time)
        print(f"\n== {k}: {sum(t for _, t in rows.values()) / 1000:.2f} ms of kernels (prefill + 8 steps)")
        for key, (n, t) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"  {t / 1000:8.3f} ms  {n:5d}x  {key}")


if __name__ == "__main__":
    main()
