"""Prefill LoRA variants for one Llama layer's seven linears, timed side by side on the GPU.

Why: in prefill the LoRA FLOPs are ~1% of the base GEMMs, so what LoRA costs is
memory traffic (writing and re-reading a full-width delta) and how the base GEMM
behaves when it must also read a C operand. This times, per linear and summed
over a layer (q, k, v, o, gate, up, down), for one adapter / 4 / a distinct one
per row:

* base:        out = x @ W.T                       (cuBLAS, beta = 0)
* delta_beta1: delta = bmm(bmm(x, A.T), B.T); delta += x @ W.T   (the engine's torch path: GEMM with beta = 1)
* baddbmm:     out = x @ W.T; out += bmm(bmm(x, A.T), B.T) in place (baddbmm, K = rank)
* triton:      out = x @ W.T; the SGMV kernels add into out in place

    PYTHONPATH=. python3 bench/prefill_variants.py --size 1b --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.engine.multilora import ops  # noqa: E402

SHAPES = {  # hidden, intermediate, kv dim
    "1b": (2048, 8192, 512),
    "8b": (4096, 14336, 1024),
}


def shape_args(iters: int) -> argparse.Namespace:
    """The prefill kernel benches' common options: Llama size, batch x prompt, rank, timed iterations."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--json", action="store_true")
    return ap.parse_args()


def timed(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    args = shape_args(iters=20)
    dev, dt = "cuda", torch.bfloat16
    h, inter, kv = SHAPES[args.size]
    linears = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, inter), "up": (h, inter),
               "down": (inter, h)}
    N, S, r, K = args.batch, args.prompt_len, args.rank, args.batch + 1
    mixes = {"single": [1] * N, "mixed4": [1 + i % 4 for i in range(N)], "mixed_all": list(range(1, N + 1))}
    g = torch.Generator(device=dev).manual_seed(0)
    res: dict = {"size": args.size, "batch": N, "prompt_len": S, "rank": r,
                 "device_name": torch.cuda.get_device_name(0)}
    kernels = None
    try:
        from handler.engine import kernels as k

        kernels = k if k.available() else None
    except Exception:
        pass
    totals: dict = {}
    for name, (d_in, d_out) in linears.items():
        x = torch.randn(N, S, d_in, device=dev, dtype=dt, generator=g)
        W = torch.randn(d_out, d_in, device=dev, dtype=dt, generator=g) / d_in ** 0.5
        A = torch.zeros(K, 64, d_in, device=dev, dtype=dt)
        Bt = torch.zeros(K, 64, d_out, device=dev, dtype=dt)
        A[1:, :r] = torch.randn(K - 1, r, d_in, device=dev, dtype=dt, generator=g) / d_in ** 0.5
        Bt[1:, :r] = torch.randn(K - 1, r, d_out, device=dev, dtype=dt, generator=g) / r
        scaling = torch.full((K,), 2.0, device=dev, dtype=dt)
        scaling[0] = 0
        x2d = x.view(-1, d_in)
        t = {"base": timed(lambda: x2d @ W.t(), args.iters)}
        for mix, slot_list in mixes.items():
            slots = torch.tensor(slot_list, device=dev)
            plan = ops.prepare_mixed(slots, A, Bt.transpose(1, 2), scaling, rank=r)

            def delta_beta1():
                d = ops.mixed_delta(x, plan)
                return ops.base_plus_delta(d, x, W, None)

            def baddbmm():
                out = (x2d @ W.t()).view(N, S, d_out)
                return out.baddbmm_(torch.bmm(x, plan.a_rows.transpose(1, 2)), plan.bt_rows)

            ref = delta_beta1()
            assert torch.allclose(baddbmm().float(), ref.float(), atol=5e-2, rtol=5e-2)
            t[f"delta_beta1_{mix}"] = timed(delta_beta1, args.iters)
            t[f"baddbmm_{mix}"] = timed(baddbmm, args.iters)
            if kernels is not None:
                def triton():
                    out = (x2d @ W.t()).view(N, S, d_out)
                    return kernels.add_mixed_triton_(out, x, slots, A, Bt, scaling, r)

                assert torch.allclose(triton().float(), ref.float(), atol=5e-2, rtol=5e-2)
                t[f"triton_{mix}"] = timed(triton, args.iters)
        for key, ms in t.items():
            res[f"{name}_{key}_ms"] = round(ms, 4)
            totals[key] = totals.get(key, 0.0) + ms
        del x, W, A, Bt
    for key, ms in totals.items():
        res[f"layer_{key}_ms"] = round(ms, 4)
        if key != "base":
            res[f"layer_ratio_{key}"] = round(ms / totals["base"], 4)
    print(json.dumps(res) if args.json else "\n".join(f"{k:32s} {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
