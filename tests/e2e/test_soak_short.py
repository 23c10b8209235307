"""Short soak in CI (bench/soak.py runs long ones): real torchserve + redis-server,
tenants = 3 × capacity, 16 concurrent clients, every answer checked."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from soak import run_soak  # noqa: E402

pytestmark = pytest.mark.e2e


def test_short_soak_has_no_5xx_and_no_wrong_outputs(tmp_path):
    result = run_soak(20, workdir=tmp_path, capacity=2, concurrency=16)
    assert result["requests"] >= 50, result
    assert result["errors_5xx"] == 0 and result["transport_errors"] == 0, result
    assert result["wrong_outputs"] == 0, result["wrong_examples"]
    assert result["errors_4xx"] == 0
    assert result["evictions"] > 0  # 6 tenants on 2 resident slots
