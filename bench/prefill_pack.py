"""What eager prefill steps cost by the chunks they carry (CPU), the figures behind
`handler.engine.stepping.CPU_FORWARD_TOKENS`, the padding `_pack` trades for one forward fewer.

    python bench/prefill_pack.py --json                 # SmolLM2-135M shape, random weights, fp32, 1 thread
    python bench/prefill_pack.py --size tiny --json     # smoke

Each case adds rows with prompts of the given lengths to an idle `Stepper` (no row decoding)
and times the one `Stepper.step()` that prefills them all (host clock around the call; median
of --reps, every rep on fresh rows); the stepper groups them into forwards as `_pack` decides
(``forwards``, from its counter). ``apart_<a>+<b>_ms`` times the two rows joining in two steps,
one each (two directly timed steps, summed). From the single-row cases: ``per_token_ms`` (the
slope between the shortest and longest single prompt) and ``fixed_ms`` (the intercept), and
``fixed_in_tokens`` = fixed_ms / per_token_ms. Figures: bench/RESULTS.md, never here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import harness  # bench/ is first on sys.path when this script runs

from handler.engine import EngineSettings, GenerationRow, SamplingParams, StepLimits, make_engine

SINGLE = (16, 32, 64, 128, 256)
GROUPS = ((64, 64), (32, 32, 32, 32), (16,) * 8, (128, 64), (48, 30, 30))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(harness.SIZES), default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = harness.build_base(a.size, torch.float32, torch.device("cpu"))
    vocab = harness.SIZES[a.size]["vocab_size"]
    eng = make_engine("multilora", model, EngineSettings(num_slots=4, max_rank=16, decode="static"),
                      eos_token_ids=[], pad_token_id=0)
    st = eng.stepper(StepLimits(max_rows=16, max_len=1024, prefill_chunk=1024))

    def step_with(lengths: tuple[int, ...]) -> tuple[float, int]:
        for i, n in enumerate(lengths):
            st.add(i, GenerationRow([3 + (7 * i + j) % (vocab - 3) for j in range(n)], None,
                                    SamplingParams(max_new_tokens=2)))
        before = st.prefill_forwards
        t0 = time.perf_counter()
        st.step()
        ms = (time.perf_counter() - t0) * 1000
        forwards = st.prefill_forwards - before
        for i in range(len(lengths)):
            st.cancel(i)
        st.step()  # frees the cancelled rows
        return ms, forwards

    def case(lengths: tuple[int, ...]) -> dict:
        runs = [step_with(lengths) for _ in range(a.reps)]
        return {"ms": round(statistics.median(ms for ms, _ in runs), 2), "forwards": runs[-1][1]}

    step_with((16,))  # first forward off the clock
    out: dict = {"size": a.size, "threads": a.threads, "reps": a.reps, "torch": torch.__version__}
    for n in SINGLE:
        out[f"prefill_{n}"] = case((n,))
    for g in GROUPS:
        out["prefill_" + "+".join(map(str, g))] = case(g)
    apart = [step_with((128,))[0] + step_with((64,))[0] for _ in range(a.reps)]
    out["apart_128+64_ms"] = round(statistics.median(apart), 2)
    lo, hi = out[f"prefill_{SINGLE[0]}"]["ms"], out[f"prefill_{SINGLE[-1]}"]["ms"]
    per_token = (hi - lo) / (SINGLE[-1] - SINGLE[0])
    fixed = lo - per_token * SINGLE[0]
    out.update(per_token_ms=round(per_token, 3), fixed_ms=round(fixed, 2),
               fixed_in_tokens=round(fixed / per_token, 1) if per_token > 0 else None)
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
