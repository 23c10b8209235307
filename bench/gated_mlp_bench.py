"""Prefill of a Llama MLP's gate/up pair with LoRA, timed side by side on the GPU:

* ``base``: the model without LoRA, as transformers runs it (two cuBLAS GEMMs, then
  ``silu(g) * u`` as two elementwise passes);
* ``deltas``: what the layers did before `multilora.gated_mlp` (the group kernels write
  each member's delta, its base GEMM accumulates into it, then the same ``silu(g) * u``);
* ``fused_*``: two plain GEMMs, then `kernels.group_gated_act` (shrink, then the
  activation with both expands in registers), under several launch shapes.

Why: at prefill shapes the gate/up deltas are the largest tensors LoRA adds; this shows
what fusing them into the activation saves and which tile shape does it best. Every
variant's output is checked against ``deltas`` before it is timed. Ratios are over
``base`` measured in the same run.

    PYTHONPATH=. python3 bench/gated_mlp_bench.py --size 1b --json
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.prefill_variants import SHAPES, shape_args, timed  # noqa: E402  (hidden, intermediate, kv dim)
from handler.engine.kernels import triton_lora  # noqa: E402
from handler.engine.multilora import ops  # noqa: E402

silu = torch.nn.functional.silu


def main() -> None:
    args = shape_args(iters=10)
    dev, dt = "cuda", torch.bfloat16
    h, inter, _ = SHAPES[args.size]
    N, S, r, K, r_max = args.batch, args.prompt_len, args.rank, args.batch + 1, 64
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, S, h, device=dev, dtype=dt, generator=g)
    Wg, Wu = (torch.randn(inter, h, device=dev, dtype=dt, generator=g) / h ** 0.5 for _ in range(2))
    offs = [(0, r_max * h), (r_max * (h + inter), r_max * (2 * h + inter))]
    pool = torch.zeros(K, 2 * r_max * (h + inter), device=dev, dtype=dt)
    scales = torch.full((2, K), 2.0, device=dev, dtype=dt)
    scales[:, 0] = 0
    for a_off, b_off in offs:
        pool[1:, a_off:a_off + r * h] = torch.randn(K - 1, r * h, device=dev, dtype=dt, generator=g) / h ** 0.5
        pool[1:, b_off:b_off + r * inter] = torch.randn(K - 1, r * inter, device=dev, dtype=dt, generator=g) / r
    members = [triton_lora.GroupMember(a, b, inter, m) for m, (a, b) in enumerate(offs)]
    configs = {"default": {}}
    for bm, bo, w in itertools.product((32, 64), (64, 128, 256), (4, 8)):
        configs[f"m{bm}_o{bo}_w{w}"] = dict(block_m=bm, block_o=bo, warps_act=w)
    mixes = {"single": [1] * N, "mixed4": [1 + i % 4 for i in range(N)], "mixed_all": list(range(1, N + 1))}
    res: dict = {"size": args.size, "batch": N, "prompt_len": S, "rank": r, "device_name": torch.cuda.get_device_name(0)}
    t = {"base": timed(lambda: silu(x @ Wg.t()) * (x @ Wu.t()), args.iters)}
    for mix, slot_list in mixes.items():
        slots = torch.tensor(slot_list, device=dev)

        def deltas_path():
            dg, du = triton_lora._group_deltas_rows(x, pool, scales, slots, members, h, r)
            return silu(ops.base_plus_delta(dg, x, Wg, None)) * ops.base_plus_delta(du, x, Wu, None)

        ref = deltas_path().float()
        t[f"deltas_{mix}"] = timed(deltas_path, args.iters)
        for cname, cfg in configs.items():
            def fused_path():
                return triton_lora.group_gated_act(x, x @ Wg.t(), x @ Wu.t(), pool, scales, slots, members, h, r, cfg)

            got = fused_path().float()
            assert (got - ref).abs().max() <= 3e-2 * ref.abs().max(), (mix, cname)
            t[f"fused_{cname}_{mix}"] = timed(fused_path, args.iters)
    for key, ms in sorted(t.items(), key=lambda kv: kv[1]):
        res[f"{key}_ms"] = round(ms, 4)
        if key != "base":
            res[f"ratio_{key}"] = round(ms / t["base"], 4)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:40s} {v}")


if __name__ == "__main__":
    main()
