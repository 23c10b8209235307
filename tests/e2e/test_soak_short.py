"""Short soak in CI (bench/soak.py runs long ones) on the shared e2e stack (real torchserve
+ redis-server, 2 resident adapters): 6 more tenants, 16 concurrent clients for 20 s, every
answer's status, ``adapter``, ``fallback`` and text checked (`loraplex_testing.soak`;
the adapters and prompts give pairwise different texts, asserted in setup)."""
import pytest

from loraplex_testing.isolation import build_setup
from loraplex_testing.soak import FAILURE_KEYS, onboard_all, run_soak, target_for

pytestmark = pytest.mark.e2e


def test_short_soak_has_no_failures_of_any_kind(stack, tmp_path):
    setup = build_setup(tmp_path, model_dir=stack.model, tenants=6, prompts=6, prefix="soak", seed=11)
    onboard_all(setup, redis_url=stack.redis_url, redis_prefix=stack.prefix, store=stack.store)
    result = run_soak(target_for(stack.ts), setup, 20, concurrency=16, seed=11)
    assert result["requests"] >= 30, result
    assert result["failures"] == 0, ({k: result[k] for k in FAILURE_KEYS}, result["examples"])
    assert result["ok"] == result["requests"]
    assert result["evictions"] > 0  # 6 tenants on 2 resident slots
