"""The engine bench runs end to end (`--size tiny`, CPU) and prints every figure RESULTS.md's tables use.

Runs the script as a subprocess (tests never import bench modules). Ratios must be finite and
positive, or withheld as too noisy with a reason; the timing spread must be ordered; the engine's
load/evict cycles must leave no memory behind.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("single", "mixed4", "mixed_all")


def _run_bench() -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "engine_bench.py"), "--size", "tiny", "--json",
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_engine_bench_tiny_prints_every_figure():
    res = _run_bench()
    ratio_keys = []
    for sc in SCENARIOS:
        for what in ("prefill", "decode"):
            ratio_keys += [f"{what}_ratio_{sc}", f"peft_{what}_ratio_{sc}", f"peft_over_ours_{what}_{sc}"]
    for key in ratio_keys:
        assert key in res, key
        s = res["spread"][key]
        assert s["n"] == res["rounds"] == 3, (key, s)
        assert 0 < s["min"] <= s["median"] <= s["max"], (key, s)
        if res[key] is None:
            assert res["too_noisy"][key], key
        else:
            assert math.isfinite(res[key]) and res[key] > 0 and key not in res["too_noisy"], key
            assert res[key] == s["median"], key
    for job in ["base_generate"] + [f"{side}_{sc}" for side in ("ours", "peft") for sc in SCENARIOS]:
        for what in ("prefill_ms", "decode_step_ms"):
            assert res[f"{job}_{what}"] > 0, (job, what)
        # on a CPU every decode step runs a forward, so each step is timed on its own
        assert res["decode_step_method"][job] == "per-step median", job
    assert res["peft_new_tokens"] == {sc: res["new_tokens"] for sc in SCENARIOS}
    assert res["switch_ms"] is None or res["switch_ms"] > 0  # None: the engine has no set_adapter
    for key in ("load_ms", "delete_ms", "load_floor_ratio", "peft_load_ms", "peft_switch_ms",
                "decode_floor_mixed_all", "bytes_per_adapter", "adapter_bytes"):
        assert res[key] > 0, key
    assert res["decode"] == "generate"
    assert res["cycles_done"] == 20 and res["mem_drift_bytes"] == 0
    for key in ("torch", "transformers", "peft"):
        assert res[key]


def test_prefill_pack_bench_tiny_prints_its_figures():
    """bench/prefill_pack.py (the figures behind `stepping.CPU_FORWARD_TOKENS`): every case timed, its
    forwards counted as `_pack` grouped them, and the fixed/per-token split from the single rows."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prefill_pack.py"), "--size", "tiny", "--json",
                           "--reps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    cases = {k: v for k, v in res.items() if k.startswith("prefill_")}
    assert len(cases) == 10 and all(v["ms"] > 0 and v["forwards"] >= 1 for v in cases.values())
    assert cases["prefill_64"]["forwards"] == 1 and cases["prefill_64+64"]["forwards"] == 1
    assert res["apart_128+64_ms"] > 0
    assert res["fixed_in_tokens"] is None or res["fixed_in_tokens"] > 0  # None: a tiny model's slope drowned in noise
