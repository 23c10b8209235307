"""Kernel benchmark: Triton mixed-LoRA (`handler.engine.kernels`) vs the plain-torch path vs the base matmul.

For the target linears of a Llama-shaped model (``1b``: hidden 2048, intermediate
8192, 8 KV heads of 64; ``8b``: 4096 / 14336, 8 KV heads of 128), rank 16, bf16,
batch 32, decode (S=1) and prefill (S=256), and 1 / 4 / 32 distinct adapters:

* ``base``       ``x @ W.T`` alone (``torch.mm`` into a preallocated output)
* ``torch``      base + the layer's plain-torch path: ``ops.add_uniform_`` for one
                 adapter, ``ops.add_mixed_`` with a ``prepare_mixed`` plan built once
                 (as the layer does per generate call) otherwise
* ``triton``     base + ``add_mixed_triton_``
* ``*_lora``     the LoRA part alone (adds into a preallocated output)

Timing: every variant is captured in a CUDA graph that runs it over ``C`` copies of
the weights and inputs (``C`` copies exceed 2x L2, so weights come from HBM as in a
real forward), replayed under ``triton.testing.do_bench`` (L2 flushed before each
replay, median), divided by ``C``. GB/s = floor bytes / time, floor bytes = W +
the distinct adapters' A and B at rank r + x + out (each once); ``copy_GBps`` is a
device-to-device copy measured in the same run (bytes read + written).
``layers`` sums the seven projections (q, k, v, o, gate, up, down) per model.

``--json`` prints one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

import harness
from handler.engine import kernels, lora_ops as ops
from handler.engine.kernels import tuning

MODELS = {
    # name: hidden, intermediate, kv_dim
    "1b": (2048, 8192, 512),
    "8b": (4096, 14336, 1024),
}


def projections(model: str):
    h, i, kv = MODELS[model]
    return {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}


def bench_graph(fn_per_copy, copies: int, warmup_ms: int, rep_ms: int) -> float:
    """Median µs of one call, from a CUDA graph of `copies` calls (one per copy)."""
    import triton.testing

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in range(copies):
            fn_per_copy(c)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in range(copies):
            fn_per_copy(c)
    ms = triton.testing.do_bench(g.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    del g
    return ms * 1000.0 / copies


def copy_bandwidth() -> float:
    import triton.testing

    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda")  # 1 GiB
    b = torch.empty_like(a)
    a.normal_()
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=20, rep=100, return_mode="median")
    return 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9


def run_shape(d_in, d_out, N, S, rank, dtype, scenarios, variants, l2_bytes, warmup_ms, rep_ms, gen):
    K = 33
    el = torch.tensor([], dtype=dtype).element_size()
    w_bytes = d_in * d_out * el
    pool_bytes = K * rank * (d_in + d_out) * el
    per_copy = w_bytes + pool_bytes + N * S * (d_in + d_out) * el
    copies = int(min(16, max(2, math.ceil(2.5 * l2_bytes / per_copy))))
    dev = "cuda"
    Ws = [torch.randn(d_out, d_in, device=dev, dtype=dtype, generator=gen) / d_in ** 0.5 for _ in range(copies)]
    As, Bts, scs = [], [], []
    for _ in range(copies):
        A = torch.randn(K, rank, d_in, device=dev, dtype=dtype, generator=gen) / d_in ** 0.5
        Bt = torch.randn(K, rank, d_out, device=dev, dtype=dtype, generator=gen) / rank ** 0.5
        A[0].zero_()
        Bt[0].zero_()
        sc = torch.full((K,), 2.0, device=dev, dtype=dtype)
        sc[0] = 0
        As.append(A), Bts.append(Bt), scs.append(sc)
    prefill = S > 1
    # prefill activations are far larger than L2: one x shared by the copies
    n_x = 1 if prefill else copies
    xs = [torch.randn(N, S, d_in, device=dev, dtype=dtype, generator=gen) for _ in range(n_x)]
    outs = [torch.empty(N, S, d_out, device=dev, dtype=dtype) for _ in range(n_x)]
    X = lambda c: xs[c % n_x]  # noqa: E731
    O = lambda c: outs[c % n_x]  # noqa: E731

    def mm(c):
        torch.mm(X(c).view(N * S, d_in), Ws[c].t(), out=O(c).view(N * S, d_out))

    flops = 2 * N * S * d_in * d_out
    act_bytes = N * S * (d_in + d_out) * el
    res = {"in": d_in, "out": d_out, "S": S, "copies": copies}
    res["base_us"] = bench_graph(mm, copies, warmup_ms, rep_ms)
    res["base_floor_bytes"] = w_bytes + act_bytes
    res["base_GBps"] = res["base_floor_bytes"] / res["base_us"] / 1e3
    res["base_TFLOPs"] = flops / res["base_us"] / 1e6
    res["scen"] = {}
    for name, n_distinct in scenarios:
        slots = (torch.arange(N, device=dev) % n_distinct) + 1
        ad_bytes = n_distinct * rank * (d_in + d_out) * el
        r = {"distinct": n_distinct, "floor_bytes": w_bytes + ad_bytes + act_bytes}
        if n_distinct == 1:
            plans = [(As[c][1], Bts[c][1], 2.0) for c in range(copies)]
            torch_lora = lambda c: ops.add_uniform_(O(c), X(c), *plans[c])  # noqa: E731
        else:
            plans = [ops.prepare_mixed(slots, As[c], Bts[c].transpose(1, 2), scs[c], rank=rank) for c in range(copies)]
            torch_lora = lambda c: ops.add_mixed_(O(c), X(c), plans[c])  # noqa: E731

        def triton_lora_fn(c, cfg=None):
            if cfg is None:
                kernels.add_mixed_triton_(O(c), X(c), slots, As[c], Bts[c], scs[c], rank)
            else:
                tuning.add_mixed_with_config(O(c), X(c), slots, As[c], Bts[c], scs[c], rank, cfg)

        for c in range(copies):  # correctness of this exact setup (bf16)
            ref = torch.empty_like(O(c))
            O(c).zero_()
            ops.add_mixed_(O(c), X(c), ops.prepare_mixed(slots, As[c], Bts[c].transpose(1, 2), scs[c], rank=rank))
            ref.copy_(O(c))
            O(c).zero_()
            triton_lora_fn(c)
            err = ((O(c).float() - ref.float()).norm() / ref.float().norm()).item()
            r["max_rel_err_vs_torch"] = max(r.get("max_rel_err_vs_torch", 0.0), err)
            if prefill:
                break
        r["torch_us"] = bench_graph(lambda c: (mm(c), torch_lora(c)), copies, warmup_ms, rep_ms)
        r["triton_us"] = bench_graph(lambda c: (mm(c), triton_lora_fn(c)), copies, warmup_ms, rep_ms)
        r["torch_lora_us"] = bench_graph(torch_lora, copies, warmup_ms, rep_ms)
        r["triton_lora_us"] = bench_graph(triton_lora_fn, copies, warmup_ms, rep_ms)
        r["triton_GBps"] = r["floor_bytes"] / r["triton_us"] / 1e3
        r["torch_GBps"] = r["floor_bytes"] / r["torch_us"] / 1e3
        cfg0 = tuning.choose_config(N, S, d_in, d_out, rank, dtype)
        r["config"] = {k: v for k, v in cfg0.__dict__.items() if k in ("grouped", "block_m", "split", "block_o")}
        pdl = S == 1 and tuning.pdl_enabled(dev)  # as add_mixed_triton_ decides
        r["pdl"] = pdl
        for vname, over in variants.items():
            if prefill != over.get("_prefill", False):
                continue
            kw = {"pdl": pdl, **{k: v for k, v in over.items() if not k.startswith("_")}}
            if "_kps" in over:  # k-split sized so that each shrink program runs `_kps` of `in`
                kw["k_per_split"] = over["_kps"]
                kw["split"] = -(-d_in // over["_kps"])
            cfg = tuning.choose_config(N, S, d_in, d_out, rank, dtype, **kw)
            if over.get("_shrink_only"):
                parts = [tuning.shrink_partials(cfg, N * S, dev) for _ in range(copies)]
                fn = lambda c, cfg=cfg, parts=parts: tuning.shrink_into(  # noqa: E731
                    parts[c], X(c), As[c], slots, scs[c], rank, cfg)
            else:
                fn = lambda c, cfg=cfg: triton_lora_fn(c, cfg)  # noqa: E731
            r.setdefault("variants_lora_us", {})[vname] = bench_graph(fn, copies, warmup_ms, rep_ms)
        res["scen"][name] = r
    return res


DECODE_VARIANTS = {  # LoRA-only µs of variants (default: grouped, split<=8, block_o 128|256 (out>=4096), PDL)
    "no_pdl": {"pdl": False},
    "shrink_only": {"_shrink_only": True},
    "rows_bgmv": {"grouped": False, "block_m": 1, "block_k": 256, "block_o": 128},
    "rows_shrink_only": {"grouped": False, "block_m": 1, "block_k": 256, "_shrink_only": True},
    "grouped_o64": {"block_o": 64},
    "grouped_o128": {"block_o": 128},
    "grouped_split4": {"split": 4},
    "kps64": {"_kps": 64, "block_k": 64},
    "kps128": {"_kps": 128, "block_k": 128},
    "kps256": {"_kps": 256, "block_k": 128},
    "kps256_bk256": {"_kps": 256, "block_k": 256},
}
PREFILL_VARIANTS = {
    "pdl_on": {"_prefill": True, "pdl": True},
    "shrink_only": {"_prefill": True, "_shrink_only": True},
    "bm64_o256": {"_prefill": True, "block_o": 256, "num_warps_expand": 8},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default="decode,prefill")
    ap.add_argument("--no-variants", action="store_true", help="skip the launch-config variants")
    ap.add_argument("--warmup-ms", type=int, default=10)
    ap.add_argument("--rep-ms", type=int, default=60)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and kernels.available()):
        msg = "kernel_bench needs a CUDA GPU and triton"
        print(msg)
        if args.json:
            print(json.dumps({"error": msg}))
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    gen = torch.Generator(device="cuda").manual_seed(0)
    N = args.batch
    scenarios = [("single", 1), ("mixed4", 4), (f"mixed{N}", N)]
    bw = copy_bandwidth()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "copy_GBps": round(bw, 1),
           "batch": N, "rank": args.rank, "dtype": args.dtype, "prefill_len": args.prefill_len, "models": {}}
    import triton

    out["triton"] = triton.__version__
    print(f"# {out['device']}  torch {torch.__version__}  triton {triton.__version__}  copy {bw:.0f} GB/s")
    hdr = (f"{'model':4} {'mode':7} {'proj':5} {'in':>5}x{'out':<5} {'scen':8} {'base':>8} {'torch':>8} {'triton':>8}"
           f" {'t_lora':>7} {'k_lora':>7} {'GB/s':>6} {'%cp':>4} {'err':>8}")
    print(hdr)
    for model in args.models.split(","):
        mres = {}
        for mode in args.modes.split(","):
            S = 1 if mode == "decode" else args.prefill_len
            variants = {} if args.no_variants else (DECODE_VARIANTS if S == 1 else PREFILL_VARIANTS)
            shapes = {}
            for proj, (d_in, d_out) in projections(model).items():
                key = (d_in, d_out)
                if key not in shapes:
                    shapes[key] = run_shape(d_in, d_out, N, S, args.rank, dtype, scenarios, variants, l2,
                                            args.warmup_ms, args.rep_ms, gen)
                    torch.cuda.empty_cache()
                    res = shapes[key]
                    for sname, r in res["scen"].items():
                        print(f"{model:4} {mode:7} {proj:5} {d_in:>5}x{d_out:<5} {sname:8} {res['base_us']:8.1f} "
                              f"{r['torch_us']:8.1f} {r['triton_us']:8.1f} {r['torch_lora_us']:7.1f} "
                              f"{r['triton_lora_us']:7.1f} {r['triton_GBps']:6.0f} {100 * r['triton_GBps'] / bw:4.0f}"
                              f" {r['max_rel_err_vs_torch']:8.1e}", flush=True)
                        if r.get("variants_lora_us"):
                            print("      variants (lora µs): " + ", ".join(
                                f"{k}={v:.1f}" for k, v in r["variants_lora_us"].items()), flush=True)
            per_proj = {p: shapes[s] for p, s in projections(model).items()}
            layer = {"base_us": sum(r["base_us"] for r in per_proj.values())}
            for sname, _ in scenarios:
                for m in ("torch_us", "triton_us", "torch_lora_us", "triton_lora_us"):
                    layer[f"{sname}_{m}"] = sum(r["scen"][sname][m] for r in per_proj.values())
                layer[f"{sname}_torch_ratio"] = layer[f"{sname}_torch_us"] / layer["base_us"]
                layer[f"{sname}_triton_ratio"] = layer[f"{sname}_triton_us"] / layer["base_us"]
                fb = sum(r["scen"][sname]["floor_bytes"] for r in per_proj.values())
                bb = sum(r["base_floor_bytes"] for r in per_proj.values())
                layer[f"{sname}_floor_ratio"] = fb / bb
            mres[mode] = {"layer": layer,
                          "shapes": {f"{k[0]}x{k[1]}": v for k, v in shapes.items()}}
            print(f"== {model} {mode} 7 projections: base {layer['base_us']:.1f} µs; " + "; ".join(
                f"{s}: torch {layer[f'{s}_torch_ratio']:.3f}x triton {layer[f'{s}_triton_ratio']:.3f}x "
                f"(bytes floor {layer[f'{s}_floor_ratio']:.3f}x)" for s, _ in scenarios), flush=True)
        out["models"][model] = mres
    if args.json:
        print(json.dumps(harness.rounded(out, 3)))


if __name__ == "__main__":
    main()
