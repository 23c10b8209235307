"""Randomized mixed-tenant batches through the worker's real request path (registry in a
real redis-server, adapter store, residency with 2 resident adapters for 6 tenants, so
adapters are evicted and reloaded between batches): every reply is 200 with the tenant's
``adapter``, no ``fallback`` and PEFT's text, and every engine row beneath it matches PEFT
alone on that row in tokens and logits (`loraplex_testing.isolation`; bench/isolation.py
runs more)."""
import contextlib

import pytest

from loraplex_testing.isolation import build_setup, multilora_facade, run_service_trials, wrong_slot_fault


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("iso-service"), model_dir=tiny_model_dir, seed=7)


def test_randomized_mixed_batches_never_leak_between_tenants(redis_url, tmp_path, setup):
    res = run_service_trials(60, redis_url=redis_url, workdir=tmp_path, seed=7, setup=setup)
    assert res.failures == 0, res.examples
    assert res.rows > 200
    assert res.rows_step_scored == res.rows_facade_checked == res.rows  # every row scored, reply and engine level
    assert res.evictions > 10 and res.slot_reuses > 10  # capacity 2 for 6 tenants: slots really get reused


def test_static_decode_path_never_leaks_between_tenants(redis_url, tmp_path, setup):
    res = run_service_trials(20, redis_url=redis_url, workdir=tmp_path, seed=8, decode="static", setup=setup)
    assert res.failures == 0, res.examples
    assert res.extra["decode"] == "static" and res.slot_reuses > 3


def test_a_row_served_from_the_wrong_slot_is_caught(redis_url, tmp_path, setup):
    with contextlib.ExitStack() as faults:
        res = run_service_trials(3, redis_url=redis_url, workdir=tmp_path, seed=9, setup=setup,
                                 before_trials=lambda svc: faults.enter_context(
                                     wrong_slot_fault(multilora_facade(svc.engine))))
    levels = {e.get("level") for e in res.examples}
    assert res.failures >= 2 and {"engine", "reply"} <= levels, res.examples
