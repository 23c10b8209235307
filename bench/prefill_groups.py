"""Prefill LoRA of one Llama layer by shared-input group, timed side by side on the GPU:
the torch path (per-linear gather + bmm, delta added by the base GEMM) against the
group kernels (`kernels.group_deltas_triton`, x [N, S, in]) under several launch shapes.

Why: the group kernels read each row's adapter straight from the pool and the layer
input once per group, but what prefill LoRA costs is mostly writing the full-width
delta, so the expand's launch shape decides whether they beat cuBLAS's bmm. Each
variant includes the base GEMMs (beta = 1 over the delta), so `ratio` is base+LoRA over
base for the whole layer.

    PYTHONPATH=. python3 bench/prefill_groups.py --size 1b --json
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

def main() -> None:
    args = shape_args(iters=10)
    dev, dt = "cuda", torch.bfloat16
    h, inter, kv = SHAPES[args.size]
    groups = {"qkv": (h, [h, kv, kv]), "o": (h, [h]), "gate_up": (h, [inter, inter]), "down": (inter, [h])}
    N, S, r, K, r_max = args.batch, args.prompt_len, args.rank, args.batch + 1, 64
    mixes = {"single": [1] * N, "mixed_all": list(range(1, N + 1))}
    configs = {"default": {}}
    for bm, bo, we in itertools.product((64, 128), (128, 256), (4, 8)):
        configs[f"m{bm}_o{bo}_w{we}"] = dict(block_m=bm, block_o=bo, warps_expand=we)
    configs["m64_k128_ws8"] = dict(block_k=128, warps_shrink=8)
    g = torch.Generator(device=dev).manual_seed(0)
    totals: dict = {}
    res: dict = {"size": args.size, "batch": N, "prompt_len": S, "rank": r, "device_name": torch.cuda.get_device_name(0)}
    for gname, (d_in, outs) in groups.items():
        x = torch.randn(N, S, d_in, device=dev, dtype=dt, generator=g)
        Ws = [torch.randn(o, d_in, device=dev, dtype=dt, generator=g) / d_in ** 0.5 for o in outs]
        offs, p = [], 0
        for o in outs:
            offs.append((p, p + r_max * d_in))
            p += r_max * (d_in + o)
        pool = torch.zeros(K, p, device=dev, dtype=dt)
        scales = torch.full((len(outs), K), 2.0, device=dev, dtype=dt)
        scales[:, 0] = 0
        for (a_off, b_off), o in zip(offs, outs):
            pool[1:, a_off:a_off + r * d_in] = torch.randn(K - 1, r * d_in, device=dev, dtype=dt, generator=g) / d_in ** 0.5
            pool[1:, b_off:b_off + r * o] = torch.randn(K - 1, r * o, device=dev, dtype=dt, generator=g) / r
        members = [triton_lora.GroupMember(a, b, o, m) for m, ((a, b), o) in enumerate(zip(offs, outs))]
        views = [(pool[:, a:a + r_max * d_in].view(K, r_max, d_in), pool[:, b:b + r_max * o].view(K, r_max, o))
                 for (a, b), o in zip(offs, outs)]
        x2 = x.view(-1, d_in)
        t = {"base": timed(lambda: [x2 @ W.t() for W in Ws], args.iters)}
        for mix, slot_list in mixes.items():
            slots = torch.tensor(slot_list, device=dev)

            def torch_path():  # what the layers do without the group kernels
                res_ = []
                for m, (W, (A, Bt)) in enumerate(zip(Ws, views)):
                    if mix == "single":
                        d = ops.uniform_delta(x, A[1, :r], Bt[1, :r], 2.0)
                    else:
                        d = ops.mixed_delta(x, ops.prepare_mixed(slots, A, Bt.transpose(1, 2), scales[m], rank=r))
                    res_.append(ops.base_plus_delta(d, x, W, None))
                return res_

            ref = torch_path()
            t[f"torch_{mix}"] = timed(torch_path, args.iters)
            for cname, cfg in configs.items():
                def group_path():
                    ds = triton_lora._group_deltas_rows(x, pool, scales, slots, members, d_in, r, cfg)
                    return [ops.base_plus_delta(d, x, W, None) for d, W in zip(ds, Ws)]

                for a, b in zip(group_path(), ref):
                    assert torch.allclose(a.float(), b.float(), atol=5e-2, rtol=5e-2), (gname, cname)
                t[f"group_{cname}_{mix}"] = timed(group_path, args.iters)
        for key, ms in t.items():
            res[f"{gname}_{key}_ms"] = round(ms, 4)
            totals[key] = totals.get(key, 0.0) + ms
        del x, Ws, pool
    for key, ms in sorted(totals.items(), key=lambda kv: kv[1]):
        res[f"layer_{key}_ms"] = round(ms, 4)
        if key != "base":
            res[f"layer_ratio_{key}"] = round(ms / totals["base"], 4)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            if k.startswith("layer_ratio") or not k.startswith(("qkv", "o_", "gate", "down")):
                print(f"{k:44s} {v}")


if __name__ == "__main__":
    main()
