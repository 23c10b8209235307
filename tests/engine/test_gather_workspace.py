"""The memory mixed batches gather adapters into, kept between calls
(`context.GatherWorkspace`): views come from one buffer sized by the previous
call, capped by its limit; results never depend on it; it can be released."""
from __future__ import annotations

import torch

from conftest import load_base
from handler.engine import lora_ops as ops
from handler.engine.multilora import MultiLoraModel
from handler.engine.multilora.context import GatherWorkspace
from handler.engine.settings import EngineSettings


def _inside(t: torch.Tensor, buf: torch.Tensor) -> bool:
    start = buf.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + buf.numel() * buf.element_size()


def test_takes_views_of_one_buffer_after_a_rewind_and_respects_the_limit():
    ws = GatherWorkspace(torch.float32, torch.device("cpu"), limit_bytes=4 * 1000)
    first = ws.take((3, 10))  # nothing sized yet: a fresh tensor
    assert ws.nbytes == 0 and first.shape == (3, 10) and first.is_contiguous()
    ws.take((7,))
    ws.rewind()  # sized for the last call: 30 and 7 elements, each rounded up to 64
    assert ws.nbytes == 4 * 128
    a, b = ws.take((3, 10)), ws.take((7,))
    assert _inside(a, ws._buf) and _inside(b, ws._buf) and b.data_ptr() - a.data_ptr() == 64 * 4
    over = ws.take((5, 100))  # more than the buffer holds: fresh, and remembered for the next call
    assert not _inside(over, ws._buf)
    ws.rewind()
    assert ws.nbytes == 4 * 640  # grown to the last call's 64 + 64 + 512 elements
    ws.take((2000,))
    ws.rewind()
    assert ws.nbytes == 4 * 1000  # the limit caps growth
    ws.release()
    assert ws.nbytes == 0
    off = GatherWorkspace(torch.float32, torch.device("cpu"), limit_bytes=0)
    off.take((4, 4))
    off.rewind()
    assert off.nbytes == 0


def test_prepare_mixed_into_the_workspace_equals_fresh_tensors():
    g = torch.Generator().manual_seed(0)
    A, Bt = torch.randn(4, 8, 12, generator=g), torch.randn(4, 8, 10, generator=g)
    s = torch.rand(4, generator=g)
    slots = torch.tensor([2, 0, 3])
    ws = GatherWorkspace(torch.float32, torch.device("cpu"), limit_bytes=1 << 20)
    for _ in range(2):  # the second pass gathers into the buffer sized by the first
        plan = ops.prepare_mixed(slots, A, Bt.transpose(1, 2), s, rank=5, workspace=ws)
        want = ops.prepare_mixed(slots, A, Bt.transpose(1, 2), s, rank=5)
        assert torch.equal(plan.a_rows, want.a_rows) and torch.equal(plan.bt_rows, want.bt_rows)
        ws.rewind()
    assert _inside(plan.a_rows, ws._buf) and _inside(plan.bt_rows, ws._buf)


def test_engine_reuses_it_and_results_do_not_depend_on_it(tiny_model_dir, engine_adapters, monkeypatch):
    """Mixed batches of changing adapters and ranks, under inference_mode and then no_grad, give
    the same logits with the workspace as without; from the second call on the rows are gathered
    into it (no fresh gather memory); status reports it and `release_gather_workspace` frees it."""
    ml = MultiLoraModel(load_base(tiny_model_dir), settings=EngineSettings(num_slots=5, max_rank=64))
    ref = MultiLoraModel(load_base(tiny_model_dir),
                         settings=EngineSettings(num_slots=5, max_rank=64, cpu_gather_workspace_mb=0))
    names = sorted(engine_adapters)[:4]
    for eng in (ml, ref):
        for n in names:
            eng.load_adapter(engine_adapters[n], n)
    ids = torch.randint(3, 300, (4, 6), generator=torch.Generator().manual_seed(1))
    batches = [[names[0], names[1], None, names[2]], [names[3], names[3], names[1], None], names[:4],
               [names[2], None, names[0], names[0]]]
    seen = []
    # the buffer is made during an inference_mode call; later calls without it still write into it
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            for rows in batches:
                got = ml(ids, adapter_names=rows).logits
                assert torch.equal(got, ref(ids, adapter_names=rows).logits), rows
                seen.append(ml.get_model_status()["gather_workspace_bytes"])
    assert ref.get_model_status()["gather_workspace_bytes"] == 0
    assert seen[0] > 0 and seen[-1] == max(seen)  # sized after the first call, never shrunk

    plans = []
    real = ops.prepare_mixed

    def spy(*a, **kw):
        plans.append(real(*a, **kw))
        return plans[-1]

    monkeypatch.setattr(ops, "prepare_mixed", spy)
    with torch.no_grad():
        ml(ids, adapter_names=batches[0])
    buf = ml._ctx.workspace._buf
    assert plans and all(_inside(p.a_rows, buf) and _inside(p.bt_rows, buf) for p in plans)
    assert ml.release_gather_workspace() == seen[-1]
    assert ml.get_model_status()["gather_workspace_bytes"] == 0
