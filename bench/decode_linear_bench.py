"""A decode step's linear (M = batch rows, one token each) as one Triton kernel with the LoRA
expand fused in, against cuBLAS's GEMM (what the base model runs), timed in CUDA graphs.

Why: in a graph-captured decode step LoRA costs launches, and the expand is one launch per
group on the critical path. If a Triton kernel streams W as fast as cuBLAS for these skinny
shapes, the expand can ride in its epilogue for free (`decode_linear_lora_kernel`).
Each variant runs C times per graph on C copies of the weights (C x bytes > L2), so W
streams from HBM as in a real step.

    PYTHONPATH=. python3 bench/decode_linear_bench.py --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernel_bench import bench_graph  # noqa: E402
from handler.engine.kernels import _triton_kernels as K  # noqa: E402

SHAPES = {"1b": {"q": (2048, 2048), "kv": (2048, 512), "gate": (2048, 8192), "down": (8192, 2048)},
          "8b": {"q": (4096, 4096), "kv": (4096, 1024), "gate": (4096, 14336), "down": (14336, 4096)}}
CONFIGS = [(16, 128, 4, 4), (16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 128, 8, 4),
           (32, 128, 4, 6)]  # BLOCK_N, BLOCK_K, warps, stages


def graph_us(fn, copies: int) -> float:
    return bench_graph(fn, copies, warmup_ms=5, rep_ms=40)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    M, r = args.rows, args.rank
    res: dict = {"rows": M, "rank": r, "device_name": torch.cuda.get_device_name(0)}
    for size, shapes in SHAPES.items():
        for name, (d_in, d_out) in shapes.items():
            copies = max(4, int(200e6 // (d_in * d_out * 2)))
            Ws = [torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in ** 0.5 for _ in range(copies)]
            x = torch.randn(M, d_in, device=dev, dtype=dt)
            y = torch.empty(M, d_out, device=dev, dtype=dt)
            res[f"{size}_{name}_cublas_us"] = round(graph_us(lambda i: torch.mm(x, Ws[i].t(), out=y), copies), 2)
            ref = x.float() @ Ws[0].float().t()
            best = None
            for bn, bk, w, st in CONFIGS:
                def tri(i, lora=False, xa=None, pool=None, slots=None):
                    K.decode_linear_lora_kernel[(triton.cdiv(d_out, bn),)](
                        x, Ws[i], xa if lora else x, pool if lora else x, slots if lora else x, y,
                        M, d_in, d_out, r, pool.stride(0) if lora else 0, 0, x.stride(0), Ws[i].stride(0),
                        xa.stride(1) if lora else 0, xa.stride(0) if lora else 0, y.stride(0),
                        SPLIT=1, BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16,
                        LORA=lora, IEEE=False, num_warps=w, num_stages=st)
                tri(0)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                assert err < 2e-2, (size, name, bn, bk, err)
                us = graph_us(tri, copies)
                res[f"{size}_{name}_tri_{bn}_{bk}_{w}_{st}_us"] = round(us, 2)
                if best is None or us < best[0]:
                    best = (us, (bn, bk, w, st))
            res[f"{size}_{name}_tri_best_us"] = round(best[0], 2)
            res[f"{size}_{name}_tri_best_cfg"] = best[1]
            bn, bk, w, st = best[1]
            # with the LoRA epilogue: one adapter on every row, and a distinct one per row
            Kslots = M + 1
            pool = torch.zeros(Kslots, r * d_out, device=dev, dtype=dt)
            pool[1:] = torch.randn(Kslots - 1, r * d_out, device=dev, dtype=dt) * 0.02
            xa = torch.randn(1, M, 16, device=dev, dtype=torch.float32)
            for mix, sl in (("single", [1] * M), ("mixed_all", list(range(1, M + 1)))):
                slots = torch.tensor(sl, device=dev)

                def tri_lora(i):
                    K.decode_linear_lora_kernel[(triton.cdiv(d_out, bn),)](
                        x, Ws[i], xa, pool, slots, y, M, d_in, d_out, r, pool.stride(0), 0, x.stride(0),
                        Ws[i].stride(0), xa.stride(1), xa.stride(0), y.stride(0), SPLIT=1,
                        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16, LORA=True,
                        IEEE=False, num_warps=w, num_stages=st)
                tri_lora(0)
                bt = pool.view(Kslots, r, d_out)[slots].float()
                ref_l = ref + torch.einsum("mr,mro->mo", xa[0], bt)
                err = ((y.float() - ref_l).abs().max() / ref_l.abs().max()).item()
                assert err < 2e-2, (size, name, mix, err)
                res[f"{size}_{name}_tri_lora_{mix}_us"] = round(graph_us(tri_lora, copies), 2)
            del Ws
            print(f"{size} {name}: cublas {res[f'{size}_{name}_cublas_us']} us, triton best {best[0]:.2f} us "
                  f"{best[1]}, +lora single {res[f'{size}_{name}_tri_lora_single_us']} "
                  f"mixed_all {res[f'{size}_{name}_tri_lora_mixed_all_us']}", flush=True)
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
