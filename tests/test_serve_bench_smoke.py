"""bench/serve_bench.py: the workload generator is deterministic and long-tailed as its help says
(pure functions of loraplex_testing.serveload), and short runs with a tiny random model print the
issue's keys with no 5xx and no wrong output (TorchServe: both schedulers on the same workload,
the `openai` client streaming; in-process: LoraplexService). The bench runs as a subprocess (tests
never import bench modules)."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loraplex_testing import serveload
from loraplex_testing.serveload import LengthDist, Outcome, ServeRequest, WorkloadSpec

ROOT = Path(__file__).resolve().parents[1]
ISSUE_KEYS = ("scheduler", "rate", "requests", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
              "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "errors_5xx", "wrong_outputs", "evictions",
              "graph_captures_after_warmup")
TENANTS = [f"t{i}" for i in range(12)]
WORDS = ["alpha", "beta", "gamma", "delta", "eps"]


def _work(seed=0, rate=2.0, n=50, **kw):
    return serveload.make_workload(WorkloadSpec(n, rate, seed=seed, **kw), TENANTS, WORDS)


def test_workload_is_deterministic_for_a_seed_and_rate_only_moves_arrivals():
    a, b, c = _work(0), _work(0), _work(1)
    assert a == b
    assert a != c and [r.prompt for r in a] != [r.prompt for r in c]
    faster = _work(0, rate=8.0)
    assert [(r.tenant, r.prompt, r.max_tokens) for r in faster] == [(r.tenant, r.prompt, r.max_tokens) for r in a]
    assert all(math.isclose(f.arrival_s * 4, s.arrival_s, rel_tol=1e-9) for f, s in zip(faster, a))
    assert serveload.retimed(a, 2.0, 8.0) == faster
    assert all(len(r.prompt.split()) == r.prompt_words and set(r.prompt.split()) <= set(WORDS) for r in a)


def test_lengths_are_clipped_lognormal_with_a_long_tail():
    import random

    dist = serveload.PROMPT_WORDS
    rng = random.Random(5)
    xs = [dist.draw(rng) for _ in range(5000)]
    assert min(xs) >= dist.low and max(xs) <= dist.high
    med = statistics.median(xs)
    assert abs(med - dist.median) <= 0.1 * dist.median, med
    assert statistics.mean(xs) > 1.3 * med  # right tail: mean well above the median
    p99 = serveload.percentile(xs, 99)
    assert p99 >= 6 * med, (p99, med)  # exp(2.33 sigma) ~ 10x for sigma 1
    out = [serveload.OUTPUT_TOKENS.draw(rng) for _ in range(5000)]
    assert serveload.percentile(out, 99) >= 4 * statistics.median(out)
    # a degenerate distribution is exactly its median
    assert {LengthDist(7, 0.0, 1, 100).draw(rng) for _ in range(20)} == {7}
    assert "lognormal(median=48, sigma=1)" in str(dist)


def test_arrivals_are_poisson_and_tenants_zipf():
    work = _work(3, rate=5.0, n=4000)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(work, work[1:])]
    assert work[0].arrival_s == 0 and min(gaps) > 0
    assert abs(statistics.mean(gaps) - 0.2) < 0.02
    assert abs(statistics.stdev(gaps) / statistics.mean(gaps) - 1) < 0.1  # exponential: cv = 1
    counts = Counter(r.tenant for r in work)
    ranked = [counts[t] for t in TENANTS]
    assert ranked[0] > ranked[1] > ranked[3] > ranked[11] > 0
    assert 1.8 < ranked[0] / ranked[1] < 2.6  # weight ratio 2^1.1 = 2.14


def test_percentiles_and_summary():
    assert serveload.percentile([], 50) is None
    assert serveload.percentile([3, 1, 2], 50) == 2 and serveload.percentile(list(range(1, 101)), 99) == 99
    r = ServeRequest(0, 0.0, "t0", "x", 1, 4)
    ok = Outcome(r, status=200, text="abc", tokens=4, start=10.0, first=10.1, end=10.4,
                 chunk_times=[10.1, 10.2, 10.4])
    bad = Outcome(ServeRequest(1, 0.1, "t1", "y", 1, 4), status=503, start=10.1, end=10.2, error="busy")
    s = serveload.summarize([ok, bad], scheduler="continuous", rate=2.0)
    assert set(ISSUE_KEYS) <= set(s)
    assert s["errors_5xx"] == 1 and s["ok"] == 1 and s["output_tokens"] == 4
    assert s["ttft_p50_ms"] == pytest.approx(100) and s["e2e_p99_ms"] == pytest.approx(400)
    assert s["itl_p50_ms"] == pytest.approx(100) and s["itl_p99_ms"] == pytest.approx(200)
    assert s["output_tok_s"] == pytest.approx(4 / 0.4)
    alone = Outcome(r, status=200, text="abd", tokens=4, start=0, end=1)
    assert serveload.wrong_outputs([ok, bad], [alone])[0] == 1
    assert serveload.wrong_outputs([ok, bad], [Outcome(r, status=200, text="abc", start=0, end=1)])[0] == 0
    assert serveload.check_sample(10, 30, 0) == list(range(10))
    picked = serveload.check_sample(100, 30, 0)
    assert len(set(picked)) == 30 and picked == serveload.check_sample(100, 30, 0)
    assert serveload.evictions({"evictions_lru": 2, "evictions_idle": 1, "loads": 9}) == 3


def test_near_ties_need_the_timed_token_close_to_the_alone_best():
    """A half-precision answer leaving the alone answer where the alone run's top two were within
    the tolerance is a near tie; farther apart, or a token outside the alone top-k, is wrong."""
    r = ServeRequest(0, 0.0, "t0", "x", 1, 4)

    def timed(ids):
        return Outcome(r, status=200, text=" ".join(f"w{i}" for i in ids), token_ids=tuple(ids),
                       token_texts=tuple(f"w{i}" for i in ids), start=0, end=1)

    alone = timed([5, 6, 7])
    alone.top_logprobs = [[("w5", -0.1)], [("w6", -1.00), ("w9", -1.04), ("w8", -1.5)], [("w7", -0.2)]]
    for ids, tol, wrong in [([5, 9, 1], 0.1, 0), ([5, 9, 1], 0.01, 1), ([5, 8, 1], 0.1, 1), ([5, 4, 1], 0.1, 1),
                            ([5, 9, 1], None, 1), ([5, 6, 7], None, 0)]:
        ties: list[dict] = []
        n, examples = serveload.wrong_outputs([timed(ids)], [alone], tol, ties)
        assert n == wrong, (ids, tol, examples)
        assert len(ties) == (1 if (ids, tol) == ([5, 9, 1], 0.1) else 0)
    ties = []
    serveload.wrong_outputs([timed([5, 9, 1])], [alone], 0.1, ties)
    assert ties[0]["gap"] == pytest.approx(0.04)


def _run(*args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "serve_bench.py"), *args, "--request-timeout", "120", "--json"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(f"serve_bench did not finish in 400 s; stderr ends:\n{err[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_clean(run: dict, n: int) -> None:
    assert set(ISSUE_KEYS) <= set(run), sorted(set(ISSUE_KEYS) - set(run))
    assert run["requests"] == n and run["ok"] == n, run["error_examples"]
    assert run["errors_5xx"] == 0 and run["wrong_outputs"] == 0, run.get("wrong_examples")
    assert run["checked"] == n  # every request re-sent alone (fewer than --check)
    assert run["output_tok_s"] > 0 and run["e2e_p99_ms"] >= run["e2e_p50_ms"] > 0
    assert run["ttft_p50_ms"] <= run["e2e_p50_ms"] and run["evictions"] > 0  # 12 tenants on 4 slots


@pytest.mark.e2e
def test_torchserve_compare_tiny():
    res = _run("--target", "torchserve", "--model", "tiny", "--compare", "--requests", "16", "--rate", "8")
    for sch in ("static", "continuous"):
        _assert_clean(res[sch], 16)
        assert res[sch]["scheduler"] == sch
    s = res["static"]
    # static: the whole text is one chunk (then the last chunk with usage): TTFT ~ e2e, no gaps
    assert s["itl_p50_ms"] is None and 0.8 * s["e2e_p50_ms"] <= s["ttft_p50_ms"] <= s["e2e_p50_ms"]
    assert res["continuous_over_static_tok_s"] > 0 and res["prefill_alone_ms"] > 0
    assert res["ttft_p50_over_prefill"] > 0


def test_inprocess_tiny():
    res = _run("--target", "inprocess", "--size", "tiny", "--device", "cpu", "--requests", "16", "--rate", "8",
               "--tenants", "12", "--resident", "4", "--kv-rows", "8")
    _assert_clean(res, 16)
    assert res["scheduler"] == "continuous" and res["itl_p50_ms"] is not None
    assert res["graph_captures_after_warmup"] == 0  # a CPU stepper captures nothing
    assert res["load_thread_ms_during_run"] > 0  # 12 tenants on 4 slots: loads held the scheduler thread
    # the GPU targets' yardsticks, computed here on the CPU too
    for key in ("engine_static_batch_tok_s", "one_tenant_output_tok_s"):
        assert res[key] > 0, key
    assert res["decode_step_ms"] >= 0  # a difference of two timings: 0 when noise swallows it
    assert res["one_tenant_errors_5xx"] == 0 and set(res["targets"]) == {
        "tok_s_ge_85pct_of_engine_static_batch", "one_tenant_at_most_10pct_faster", "graph_captures_after_warmup_0",
        "itl_p99_le_1_5x_decode_step"}
