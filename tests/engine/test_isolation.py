"""Isolation at the engine: the engine knows nothing of tenants, Redis or TorchServe, and
every row of a mixed batch gets what PEFT gives that row alone, through adapter
deletes/loads that hand slots to other tenants between batches, on every decode path
(`loraplex_testing.isolation`; bench/isolation.py runs more trials)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraplex_testing.isolation import (build_setup, check_row, engine_for, multilora_facade, run_engine_trials,
                                        wrong_slot_fault)

ROOT = Path(__file__).resolve().parents[2]


def test_engine_imports_no_tenant_redis_or_torchserve_code():
    code = ("import sys; import handler.engine, handler.engine.multilora, handler.engine.peft_engine, "
            "handler.engine.generation; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tenant_registry', 'redis', 'ts')); "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_engine_never_uses_torch_load():
    for path in (ROOT / "handler" / "engine").rglob("*.py"):
        assert "torch.load(" not in path.read_text(), path


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """6 adapters + 10 prompts on which every two of them and the base model provably differ
    (build_setup asserts it)."""
    return build_setup(tmp_path_factory.mktemp("iso-engine"), model_dir=tiny_model_dir)


def test_a_row_served_by_any_other_model_fails_the_row_check(setup):
    """The check can fail: for every prompt, each model's greedy tokens judged as another's."""
    oracle, n = setup.oracle, setup.max_new_tokens
    for prompt in setup.prompts:
        ids = oracle.prompt_ids(prompt)
        runs = {a: oracle.greedy(a, ids, n) for a in setup.names}
        for want in setup.names:
            finish = "length" if len(runs[want]) == n else "stop"
            assert check_row(oracle, want, ids, runs[want], finish, n, tol=1e-4)[0] == []
            for got in setup.names:
                if got != want:
                    finish = "length" if len(runs[got]) == n else "stop"
                    fails, _ = check_row(oracle, want, ids, runs[got], finish, n, tol=1e-4)
                    assert fails, (want, got, prompt)


@pytest.mark.parametrize("decode", ["generate", "static"])
def test_mixed_batches_match_peft_through_evictions_and_slot_reuse(setup, decode):
    engine = engine_for(setup, decode=decode, capacity=3)
    res = run_engine_trials(engine, setup, 40, seed=3, capacity=3)
    assert res.failures == 0, res.examples
    assert res.rows >= 100 and res.rows_step_scored == res.rows == res.rows_facade_checked
    assert res.slot_reuses >= 20  # slots really passed from one tenant to another between batches


def test_static_slot_tensor_serves_whichever_tenants_it_names(setup):
    """The lookup a captured graph replays: the facade reads its rows' slots from ONE tensor
    rewritten in place between batches (`static_batch`, the Triton kernels; on a CPU through
    Triton's interpreter), while adapters are deleted and loaded under it."""
    pytest.importorskip("triton")
    engine = engine_for(setup, decode="static", capacity=3)
    res = run_engine_trials(engine, setup, 6, seed=4, capacity=3, static_slots=True, score_steps=False)
    assert res.failures == 0, res.examples
    assert res.slot_reuses >= 2 and res.rows_facade_checked == res.rows


@pytest.mark.parametrize("decode", ["generate", "static"])
def test_a_row_on_the_wrong_slot_is_caught(setup, decode):
    engine = engine_for(setup, decode=decode, capacity=3)
    with wrong_slot_fault(multilora_facade(engine)):
        res = run_engine_trials(engine, setup, 4, seed=5, capacity=3, facade_check=False)
    assert res.failures >= 1 and all("step 0" in " ".join(e["reasons"]) for e in res.examples), res.examples


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replays_serve_other_tenants_after_evictions(setup):
    """CUDA: captured decode graphs replayed for batches of other tenants, slots refilled in
    between; a slot mix-up inside the replayed graph is caught (tokens are checked: replays run
    no hooks, so per-step logits are not observed there)."""
    engine = engine_for(setup, decode="graphs", device="cuda", capacity=3)
    res = run_engine_trials(engine, setup, 12, seed=6, capacity=3, score_steps=False, static_slots=True)
    dec = engine.get_model_status()["decoder"]
    assert res.failures == 0, res.examples
    assert dec["captures"] >= 1 and dec["fallbacks"] == 0 and sum(b["replays"] for b in dec["buckets"]) > 20
    assert res.slot_reuses >= 4
    with wrong_slot_fault(multilora_facade(engine)):
        bad = run_engine_trials(engine, setup, 3, seed=7, capacity=3, score_steps=False, facade_check=False)
    assert bad.failures >= 1
