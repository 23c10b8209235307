"""Randomized mixed-tenant batches with forced eviction/reload: every row equals
its prompt run alone with its tenant's adapter in PEFT (bench/isolation.py runs more)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from isolation import run_trials  # noqa: E402


def test_randomized_mixed_batches_never_leak_between_tenants(redis_url, tmp_path):
    result = run_trials(100, redis_url=redis_url, workdir=tmp_path, seed=7)
    assert result["rows"] > 100
    assert result["evictions"] > 10  # capacity 2 for 6 tenants: slots really get reused
    assert result["mismatches"] == 0, result["examples"]
