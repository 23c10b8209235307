"""What one continuous-batching step costs (`handler.engine.stepping.Stepper`), by what it does.

    python bench/step_bench.py --size 1b --json            # GPU: random-weight Llama shapes, bf16
    python bench/step_bench.py --size tiny --device cpu    # smoke (tests/test_bench_smoke.py)

With --rows rows decoding (mixed adapters, one per row, round robin over --adapters), each case
times whole `Stepper.step()` calls (host clock around the call, which ends with the step's
tokens on the host), median of --reps:

- ``decode_ms``: a step of the decoding rows only;
- ``join_<L>_ms``: a step in which one new row with an L-token prompt joins (its prefill, then
  the same decode), for each L of --prompts; the row is cancelled after, so every rep joins anew;
- ``prefill_alone_<L>_ms``: the same L-token prefill in a step with no row decoding;
- ratios over ``decode_ms`` in the same run;
- with ``--prefill graphs,eager`` (the default) all of it twice in one run: captured prefill graphs,
  then every prefill eager (``eager_prefill_*``), and ``eager_prefill_over_graphs_join_<L>``. On a
  CPU both modes run eagerly (no graphs);
- mode ``mixed``: the joining row's first ``--mixed-tokens`` prompt tokens ride in the decode
  step's forward (``step_mixed``; a longer prompt's join step carries only that much), keys
  ``mixed_*``; ``mixed-fused``: the same with the members' GEMMs in Triton with the expand fused
  in however many rows the step has (`groups.FUSED_DECODE_MAX_ROWS` = `GROUPED_MAX_ROWS`; by
  default only up to 32 rows), keys ``mixed_fused_*``.

Steps are timed without overlap (each step waits for its own tokens, so its device time is in
its wall time). ``--max-rank`` sizes the pool: a captured prefill or mixed step runs its LoRA
kernels at the pool's top rank bucket (serve_bench's pool: 64).

`--profile L` also prints torch.profiler's top device kernels of one join step of length L.
Figures: bench/RESULTS.md, never here.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import harness
from harness import log


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(harness.SIZES), default="1b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--rows", type=int, default=30, help="rows decoding")
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters of the decoding rows")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-rank", type=int, default=0, help="the pool's max_rank (0: max(16, --rank))")
    ap.add_argument("--mixed-tokens", type=int, default=64)
    ap.add_argument("--kv-rows", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--prompts", default="16,50,200,500", help="joining prompt lengths")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--profile", type=int, default=0, metavar="L", help="profile one join step of L tokens (mixed modes)")
    ap.add_argument("--profile-all", action="store_true", help="--profile in every mode")
    ap.add_argument("--prefill", default="graphs,eager",
                    help="prefill modes, each measured on its own stepper in this run: graphs (captured prefill "
                         "shapes, the default serving path) and/or eager (prefill_graphs off); eager keys get the "
                         "prefix eager_prefill_")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def _synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from handler.engine import StepLimits, make_engine
    from handler.engine.settings import EngineSettings

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    base = harness.build_base(a.size, dtype, device)
    vocab = int(base.get_input_embeddings().num_embeddings)
    with tempfile.TemporaryDirectory(prefix="lpx-step-") as tmp:
        files = harness.make_adapters(base, Path(tmp), a.adapters, a.rank, 2 * a.rank)
        engine = make_engine("multilora", base, EngineSettings(num_slots=a.adapters + 2,
                                                               max_rank=a.max_rank or max(16, a.rank)),
                             eos_token_ids=[], pad_token_id=0)
        names = []
        for i, f in enumerate(files):
            engine.load_adapter(str(f), f"a{i}")
            names.append(f"a{i}")
    lengths = [int(x) for x in a.prompts.split(",") if x.strip()]

    def prompt(n: int, salt: int) -> list[int]:
        return [3 + (7 * salt + 13 * j) % (vocab - 3) for j in range(n)]

    res: dict[str, Any] = {"size": a.size, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                           "rows": a.rows, "adapters": a.adapters, "rank": a.rank}
    from handler.engine.multilora import groups

    fused_rows = groups.FUSED_DECODE_MAX_ROWS
    for mode in [m.strip() for m in a.prefill.split(",") if m.strip()]:
        # prefill_wait_steps 0: a joining row is prefilled in the step it joins (the cost timed here)
        limits = StepLimits(max_rows=a.kv_rows, max_len=a.max_len, prefill_chunk=a.prefill_chunk, prefill_wait_steps=0,
                            prefill_graphs=mode != "eager", overlap=False, mixed=mode.startswith("mixed"),
                            mixed_tokens=a.mixed_tokens)
        groups.FUSED_DECODE_MAX_ROWS = groups.GROUPED_MAX_ROWS if mode == "mixed-fused" else fused_rows
        try:
            engine.stepper(replace(limits, max_rows=1))  # the engine rebuilds its (idle) stepper for other limits:
            stepper = engine.stepper(limits)  # so every mode captures its own graphs
            part = _measure(stepper, names, prompt, lengths, a, device)
        finally:
            groups.FUSED_DECODE_MAX_ROWS = fused_rows
        prefix = {"graphs": "", "eager": "eager_prefill_"}.get(mode, mode.replace("-", "_") + "_")
        res.update({prefix + k: v for k, v in part.items()})
    for length in lengths:
        if f"join_{length}_ms" in res and f"eager_prefill_join_{length}_ms" in res:
            res[f"eager_prefill_over_graphs_join_{length}"] = res[f"eager_prefill_join_{length}_ms"] / res[f"join_{length}_ms"]
    res.update(harness.env_info(device))
    harness.emit(res, a.json)
    return 0


def _measure(stepper: Any, names: list[str], prompt: Any, lengths: list[int], a: argparse.Namespace,
             device: torch.device) -> dict[str, Any]:
    """One stepper's figures: warm-up, a decode step, join steps, prefills alone (see the module docstring)."""
    from handler.engine import GenerationRow, SamplingParams

    t0 = time.monotonic()
    stepper.warmup()
    res: dict[str, Any] = {"warmup_s": round(time.monotonic() - t0, 1)}
    long = SamplingParams(max_new_tokens=a.max_len // 2)
    for i in range(a.rows):  # the decoding rows: prefilled and one token in before anything is timed
        stepper.add(i, GenerationRow(prompt(32, i), names[i % len(names)], long))
    started: set[int] = set()
    while len(started) < a.rows:  # until every row has its first token (its prompt is in the cache)
        started.update(e.row_id for e in stepper.step())
    stepper.step()

    def step_ms() -> float:
        _synced(device)
        t = time.perf_counter()
        stepper.step()
        return (time.perf_counter() - t) * 1000

    res["decode_ms"] = statistics.median([step_ms() for _ in range(a.reps)])
    next_id = [10_000]

    def join(length: int) -> float:
        rid = next_id[0]
        next_id[0] += 1
        stepper.add(rid, GenerationRow(prompt(length, rid), names[rid % len(names)], SamplingParams(max_new_tokens=4)))
        ms = step_ms()
        stepper.cancel(rid)
        return ms

    for length in lengths:
        res[f"join_{length}_ms"] = statistics.median([join(length) for _ in range(a.reps)])
        res[f"join_{length}_over_decode"] = res[f"join_{length}_ms"] / res["decode_ms"]
    if a.profile and (a.profile_all or stepper.mixed):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            join(a.profile)
            _synced(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        log(prof.key_averages().table(sort_by=key, row_limit=25))
    for rid in range(a.rows):
        stepper.cancel(rid)
    for length in lengths:
        res[f"prefill_alone_{length}_ms"] = statistics.median([join(length) for _ in range(a.reps)])
    res["describe"] = {k: v for k, v in stepper.describe().items() if k not in ("buckets", "prefill_buckets")}
    return res


if __name__ == "__main__":
    sys.exit(main())
