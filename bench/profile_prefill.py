"""Where prefill time goes, per CUDA kernel, for the pure base model and ours (single / mixed4 / mixed_all).

Why: `engine_bench.py` gives one ratio per scenario; this splits it by kernel
(torch.profiler) so a miss can be traced to the op that causes it. Adapters are
random values written straight into the slots (no files), rank 16 on all seven
projections, like the bench.

    PYTHONPATH=. python3 bench/profile_prefill.py --size 1b [--compare-torch]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--compare-torch", action="store_true",
                    help="also profile ours without the prefill group kernels (keys torch_*)")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    base = build_base(args.size, dt, dev)
    engines = {"": dict(), "torch_": dict(group_prefill=False)}  # group kernels (default) / torch gather + bmm
    if not args.compare_torch:
        del engines["torch_"]
    for prefix, kw in engines.items():
        ours = MultiLoraModel(clone_sharing_params(base), max_adapters=args.batch, max_rank=64, target_modules=TARGETS,
                              **kw)
        g = torch.Generator(device=dev).manual_seed(0)
        for slot in range(1, args.batch + 1):
            for layer in ours.lora_layers.values():
                a = torch.randn(args.rank, layer.in_features, device=dev, dtype=dt, generator=g) * 0.02
                b = torch.randn(layer.out_features, args.rank, device=dev, dtype=dt, generator=g) * 0.02
                layer.write_slot(slot, a, b, 2.0)
        ours._slots = {f"a{i}": i + 1 for i in range(args.batch)}  # names for adapter_names (bench only)
        engines[prefix] = ours
    ids = torch.randint(1, 32000, (args.batch, args.prompt_len), device=dev)
    B = args.batch
    rows = {"single": ["a0"] * B, "mixed4": [f"a{i % 4}" for i in range(B)], "mixed_all": [f"a{i}" for i in range(B)]}
    scen = {"base": (None, None)}
    for prefix, eng in engines.items():
        scen.update({prefix + k: (eng, v) for k, v in rows.items()})

    def run(job):
        eng, names = job
        with torch.inference_mode():
            if names is None:
                return base(input_ids=ids, use_cache=False, logits_to_keep=1)
            return eng(input_ids=ids, adapter_names=names, use_cache=False, logits_to_keep=1)

    times = {}
    for label, job in scen.items():
        for _ in range(3):
            run(job)
        ev = []
        for _ in range(7):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            run(job)
            e.record()
            torch.cuda.synchronize()
            ev.append(s.elapsed_time(e))
        times[label] = statistics.median(ev)
    print("prefill ms:", {k: round(v, 2) for k, v in times.items()},
          "ratios:", {k: round(v / times["base"], 3) for k, v in times.items()})
    from torch.profiler import ProfilerActivity, profile

    for label, job in scen.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(job)
            torch.cuda.synchronize()
        rows = {}
        for ev in prof.events():
            if ev.device_type.name == "CUDA":
                key = ev.name[:90]
                n, t = rows.get(key, (0, 0.0))
                rows[key] = (n + 1, t + ev.device_time)
        total = sum(t for _, t in rows.values())
        print(f"\n== {label}: {total / 1000:.2f} ms of kernels")
        for key, (n, t) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"  {t / 1000:8.3f} ms  {n:5d}x  {key}")


if __name__ == "__main__":
    main()
