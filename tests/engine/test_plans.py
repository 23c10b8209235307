"""`plans.route` / `plan_layer`: which plan kind serves a layer for a batch (CPU, torch backend).

The plan choice is what tenant isolation rests on: one slot on every row may take the uniform
path, any mix must read or gather per row; a layer no row's adapter targets runs the base alone."""
from __future__ import annotations

import pytest
import torch

from conftest import load_base
from handler.engine.multilora import MultiLoraModel
from handler.engine.multilora.plans import BASE_ONLY, BySlotPlan, GatheredPlan, KernelPlan, UniformPlan, plan_layer
from handler.engine.settings import EngineSettings

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"  # not targeted by r8qv


@pytest.fixture(scope="module")
def ml(tiny_model_dir, engine_adapters):
    m = MultiLoraModel(load_base(tiny_model_dir), EngineSettings(num_slots=4, max_rank=64, lora_backend="torch"))
    m.load_adapter(engine_adapters["r4"], "r4")
    m.load_adapter(engine_adapters["r8qv"], "qv")
    return m


def _plans(ml, names, tokens=(3,)):
    """Each layer's cached plan after eager forwards of `tokens` tokens per row, in one batch naming `names`."""
    with torch.no_grad(), ml.batch(names, len(names)):
        for n in tokens:
            ml.model(input_ids=torch.arange(5, 5 + n * len(names)).view(len(names), n))
        layers = ml.lora_layers
        return {n: ml._ctx.layer_plans[l.index] for n, l in layers.items()}


def test_plan_kinds_follow_the_batch(ml):
    uniform = _plans(ml, ["qv", "qv"])
    assert isinstance(uniform[Q], UniformPlan) and uniform[Q].a.shape[0] == 8
    assert uniform[K] is BASE_ONLY  # no row's adapter targets k_proj
    mixed = _plans(ml, ["qv", None])  # a base row beside an adapter row: never the uniform path
    assert isinstance(mixed[Q], GatheredPlan) and mixed[Q].rows.a_rows.shape[0] == 2
    assert mixed[K] is BASE_ONLY
    both = _plans(ml, ["r4", "qv"])
    assert isinstance(both[Q], GatheredPlan) and both[Q].rows.a_rows.shape[1] == 8  # the batch's largest rank
    assert isinstance(both[K], GatheredPlan) and both[K].rows.a_rows.shape[1] == 4
    assert ml._ctx.empty and ml._ctx.slots is None  # nothing outlives the batch


def test_kernel_forwards_and_static_batches_take_the_kernel_plan(ml):
    layer = ml.lora_layers[Q]
    ctx = ml._ctx
    ctx.set(torch.tensor([1, 0]), (0, 1))
    try:
        assert isinstance(plan_layer(layer, ctx, kernel=True), KernelPlan)
        assert plan_layer(layer, ctx, kernel=True).rank == 4
    finally:
        ctx.clear()
    ctx.set(torch.tensor([0, 0]), (0, 1, 2, 3), kernel_rank=16)  # static batch: today's adapters do not matter
    try:
        plan = plan_layer(ml.lora_layers[K], ctx, kernel=True)
        assert isinstance(plan, KernelPlan) and plan.rank == 16
    finally:
        ctx.clear()


def test_a_batch_that_starts_with_one_token_per_row_reads_slots_in_place(ml):
    """A stepper's decode step (one token per row, a new batch every step) takes `BySlotPlan`: no
    per-row gather; a batch that starts with a prompt (`generate`) gathers once and keeps that plan
    for its one-token steps after; one slot on every row stays uniform."""
    step = _plans(ml, ["r4", "qv", None], tokens=(1,))
    assert isinstance(step[Q], BySlotPlan) and step[Q].rank == 8
    assert isinstance(step[K], BySlotPlan) and step[K].rank == 4  # only r4 targets k_proj
    assert step[Q].groups is step[K].groups  # rows grouped once for the batch
    assert step[Q].groups.rows.tolist() == [0, 1]
    call = _plans(ml, ["r4", "qv", None], tokens=(3, 1, 1))
    assert isinstance(call[Q], GatheredPlan)
    assert isinstance(_plans(ml, ["qv", "qv"], tokens=(1,))[Q], UniformPlan)
    assert ml._ctx.empty and ml._ctx.held_tensors() == []  # nothing outlives the batch


def test_one_token_steps_by_slot_equal_the_rows_alone(ml):
    """Each row of a mixed one-token forward gets the logits it gets alone (fp32, rounding only)."""
    names = ["r4", None, "qv", "r4", "qv"]
    ids = torch.tensor([[7], [9], [11], [13], [7]])
    with torch.no_grad():
        with ml.batch(names, len(names)):
            mixed = ml.model(input_ids=ids).logits
            assert isinstance(ml._ctx.layer_plans[ml.lora_layers[Q].index], BySlotPlan)
        for i, name in enumerate(names):
            with ml.batch([name], 1):
                alone = ml.model(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)
