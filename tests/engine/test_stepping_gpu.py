"""Continuous batching on CUDA with every decode step replayed from a captured graph
(`handler.engine.stepping.Stepper` with ``decode: graphs``), fp32 so tokens can be compared exactly:

- rows joining and leaving at random steps give the same tokens as the same schedule run
  eagerly (``decode: static`` on the same GPU) and as each row alone (`engine.generate`), and
  log-probabilities within 1e-3 of the eager run (the Triton LoRA kernels' fp32 dots may use TF32);
- `warmup` captures every (batch bucket, key-length bucket) decode step and every prefill shape, and a
  serving run after it makes none; prefill chunks replay their graphs;
- a new adapter loaded into another slot mid-run, or a freed slot refilled, does not change the
  rows already running (vLLM #47724) through the graphs' slot tensor;
- with overlap (the default with graphs) queuing a step makes no call that waits for the device:
  the only wait is for the previous step's tokens;
- mixed steps (``mixed``: joining prompts of at most ``mixed_tokens`` in the decode step's
  forward) give the same tokens as the same schedule run eagerly with mixing and as each row
  alone, queue without waiting for the device, and serve a new adapter's rows through the graphs.
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from conftest import load_base
from handler.engine import GenerationRow, SamplingParams, StepLimits, make_engine
from handler.engine.settings import EngineSettings
from handler.engine.stepping import batch_buckets, length_buckets, mixed_shapes, prefill_length_buckets, prefill_shapes
from test_stepping import Run, _prompt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ADAPTERS = ["r4", "r8qv", "r16rs", "r16mlp", "patterned", "r64"]
LP_TOL = 1e-3


def _engine(tiny_model_dir, tokenizer, engine_adapters, decode, adapters=ADAPTERS, eos=None):
    eng = make_engine("multilora", load_base(tiny_model_dir, torch.float32, "cuda"),
                      EngineSettings(num_slots=9, max_rank=64, decode=decode),
                      eos_token_ids=eos if eos is not None else [tokenizer.eos_token_id],
                      pad_token_id=tokenizer.pad_token_id)
    for name in adapters:
        eng.load_adapter(str(engine_adapters[name]), name)
    return eng


def _schedule(seed: int, n_rows: int, long_prompts: bool = False):
    rng = random.Random(seed)
    lengths = [1, 3, 8, 19, 40] + ([150, 230, 290] if long_prompts else [])
    rows = {}
    for i in range(n_rows):
        sampled = rng.random() < 0.2
        rows[i] = GenerationRow(_prompt(rng, rng.choice(lengths)), rng.choice([None, *ADAPTERS]),
                                SamplingParams(max_new_tokens=rng.randint(1, 20), logprobs=rng.choice([0, 2]),
                                               do_sample=sampled, temperature=1.3, seed=1000 + i if sampled else None))
    return rows


def _drive(stepper, rows, seed):
    """The same random arrivals and cancels for a given seed, whatever the stepper."""
    rng = random.Random(seed)
    run = Run(stepper)
    pending = list(rows)
    cancelled = set()
    while pending or stepper.rows():
        while pending and stepper.free_rows() and rng.random() < 0.5:
            i = pending.pop(0)
            run.add(i, rows[i])
        if stepper.rows() and rng.random() < 0.05:
            victim = sorted(stepper._rows)[0]
            stepper.cancel(victim)
            cancelled.add(victim)
        if stepper.rows():
            run.step()
        assert run.steps < 2000
    return run, cancelled


@pytest.mark.parametrize("mixed", [False, True], ids=["separate-prefill", "mixed"])
def test_graph_steps_equal_eager_steps_and_rows_alone(tiny_model_dir, tokenizer, engine_adapters, mixed):
    """Mixed (``mixed=None``: on with graphs): joining prompts of at most `mixed_tokens` ride in the
    decode steps' captured graphs; separate (the default): every prefill chunk is a forward of its own."""
    graphs = _engine(tiny_model_dir, tokenizer, engine_adapters, "graphs")
    eager = _engine(tiny_model_dir, tokenizer, engine_adapters, "static")
    # prefill_wait_steps 0: joining rows start at once on both steppers, so the seeded schedule
    # (which rows run when a cancel comes) is the same; the deferral is tested below
    # (the eager run overlaps too, so the same seeded cancels hit the same rows: with overlap a
    # row's end reaches the host, and the row leaves, one step later; it mixes too, in chunks of
    # the same sizes: the graphs' shapes are powers of two, so mixed_tokens 64 splits alike)
    limits = StepLimits(max_rows=6, max_len=320, prefill_chunk=48, prefill_wait_steps=0,
                        mixed=None if mixed else False, mixed_tokens=64)  # chunks of 64 or less: some steps mix
    gs, es = graphs.stepper(limits), eager.stepper(replace(limits, overlap=True, mixed=mixed))
    assert gs.describe()["graphs"] is True and es.describe()["graphs"] is False
    assert gs.overlap and es.overlap  # graphs overlap by default
    assert gs.mixed is mixed and es.mixed is mixed  # mixed=None: on with graphs
    assert gs.describe()["graph_ranks"] == [16, 32, 64]  # the rank buckets of a max_rank 64 pool
    gs.warmup()
    expected = len(batch_buckets(limits)) * len(length_buckets(limits.max_len)) * 3
    expected += len(prefill_shapes(limits)) * len(prefill_length_buckets(limits.max_len))  # at the top rank only
    if mixed:  # every decode bucket x chunk shape x key length, at the top rank
        expected += len(batch_buckets(limits)) * len(mixed_shapes(limits)) * len(length_buckets(limits.max_len))
    assert gs.describe()["captures"] == expected  # decode 1, 2, 4, 6 rows x 256, 320 keys x ranks 16, 32, 64
    rows = _schedule(3, 24, long_prompts=True)
    g_run, g_cancel = _drive(gs, rows, seed=4)
    e_run, e_cancel = _drive(es, rows, seed=4)
    assert g_cancel == e_cancel
    d = gs.describe()
    assert d["captures_after_warmup"] == 0 and d["captures"] == expected, d
    assert sum(b["replays"] for b in d["buckets"]) + d["mixed_replays"] == d["decode_steps"] > 0
    # every prefill chunk fits a captured shape here (chunk 48, keys <= 320): all replayed graphs
    assert d["prefill_replays"] == d["prefill_forwards"] > 0
    assert len({b["kv_len"] for b in d["buckets"] if b["replays"]}) == 2  # both key-length buckets served
    if mixed:
        assert d["mixed_replays"] == d["mixed_steps"] > 0 and d["mixed_prompt_tokens"] > 0
        assert d["mixed_steps"] == es.describe()["mixed_steps"]  # the same chunks, eagerly
    else:
        assert len({p["rows"] for p in d["prefill_buckets"] if p["replays"]}) >= 2  # several rows in one prefill graph
        assert {b["rank"] for b in d["buckets"] if b["replays"]} == {16, 64}  # rows of rank <= 16 only, or with r64
    for i, row in rows.items():
        assert g_run.tokens[i] == e_run.tokens[i], i
        assert g_run.finished.get(i) == e_run.finished.get(i), i
        assert g_run.logprobs[i] == pytest.approx(e_run.logprobs[i], abs=LP_TOL), i
        if i not in g_cancel:
            assert g_run.tokens[i] == graphs.generate([row])[0].token_ids, i


def test_deferred_prefill_keeps_every_row_equal_to_the_row_alone(tiny_model_dir, tokenizer, engine_adapters):
    """With graphs, rows joining while others decode wait up to prefill_wait_steps to be prefilled
    together (`Stepper._defer_prefill`): fewer prefill forwards than rows, and every row's tokens
    still equal the row alone."""
    graphs = _engine(tiny_model_dir, tokenizer, engine_adapters, "graphs")
    st = graphs.stepper(StepLimits(max_rows=6, max_len=320, prefill_chunk=256, prefill_wait_steps=4, mixed=False))
    st.warmup()
    rows = _schedule(8, 24)
    run, cancelled = _drive(st, rows, seed=9)
    d = st.describe()
    assert d["captures_after_warmup"] == 0
    assert d["prefill_forwards"] < len(rows) - len(cancelled), d  # joiners shared forwards
    for i, row in rows.items():
        if i not in cancelled:
            assert run.tokens[i] == graphs.generate([row])[0].token_ids, i


def test_no_warmup_means_captures_on_the_request_path(tiny_model_dir, tokenizer, engine_adapters):
    graphs = _engine(tiny_model_dir, tokenizer, engine_adapters, "graphs")
    st = graphs.stepper(StepLimits(max_rows=4, max_len=64, prefill_chunk=16))
    rows = _schedule(5, 8)
    run, cancelled = _drive(st, rows, seed=6)
    d = graphs.get_model_status()["stepper"]
    assert d["captures_after_warmup"] == d["captures"] >= 1
    for i, row in rows.items():
        if i not in cancelled:
            assert run.tokens[i] == graphs.generate([row])[0].token_ids, i


@pytest.mark.parametrize("mixed", [False, True], ids=["separate-prefill", "mixed"])
def test_new_adapter_mid_run_does_not_change_running_rows_through_graphs(tiny_model_dir, tokenizer,
                                                                         engine_adapters, mixed):
    """vLLM #47724 through graphs: the captured step reads each row's slot from a tensor the
    stepper writes per step; loading into another slot, or refilling a freed one, must not
    change what a running row gets."""
    graphs = _engine(tiny_model_dir, tokenizer, engine_adapters, "graphs", adapters=["r4", "r8qv"])
    st = graphs.stepper(StepLimits(max_rows=4, max_len=64, prefill_chunk=16, mixed=mixed))
    st.warmup()
    rng = random.Random(21)
    rows = {0: GenerationRow(_prompt(rng, 6), "r4", SamplingParams(max_new_tokens=30, logprobs=1)),
            1: GenerationRow(_prompt(rng, 9), None, SamplingParams(max_new_tokens=30)),
            2: GenerationRow(_prompt(rng, 4), "r4", SamplingParams(max_new_tokens=30))}
    want = {i: graphs.generate([r])[0] for i, r in rows.items()}
    run = Run(st)
    for i, r in rows.items():
        run.add(i, r)
    for _ in range(3):
        run.step()
    graphs.load_adapter(str(engine_adapters["r16rs"]), "r4@v2")  # a new version beside the running one
    rows[3] = GenerationRow(rows[0].input_ids, "r4@v2", SamplingParams(max_new_tokens=12))
    run.add(3, rows[3])
    for _ in range(3):
        run.step()
    run.st.cancel(2)
    graphs.delete_adapter("r8qv")  # unused: its slot freed, then refilled with other weights
    graphs.load_adapter(str(engine_adapters["patterned"]), "other")
    rows[4] = GenerationRow(_prompt(rng, 5), "other", SamplingParams(max_new_tokens=10))
    run.add(4, rows[4])
    while st.rows():
        run.step()
    for i in (0, 1):
        assert run.tokens[i] == want[i].token_ids, i
    assert run.logprobs[0] == pytest.approx(want[0].token_logprobs, abs=LP_TOL)
    assert run.tokens[2] == want[2].token_ids[: len(run.tokens[2])]
    for i in (3, 4):
        assert run.tokens[i] == graphs.generate([rows[i]])[0].token_ids, i
    assert st.describe()["captures_after_warmup"] == 0
    assert (st.describe()["mixed_replays"] > 0) is mixed  # mixed: the new rows' prompts rode in captured mixed steps


@pytest.mark.parametrize("mixed", [False, True], ids=["separate-prefill", "mixed"])
def test_overlap_queues_a_step_without_waiting_for_the_device(tiny_model_dir, tokenizer, engine_adapters, mixed):
    """`torch.cuda.set_sync_debug_mode("error")` raises on any call that waits for the device
    (pageable host-to-device copies, `.item()`, `.tolist()` of a device tensor, ...). Queuing
    steps (compaction, captured prefill and decode, picks, log-probs, the copies back) must make
    none; the one wait is `_deliver`'s event on the previous step's tokens (not such a call), and
    rows still equal each row alone."""
    graphs = _engine(tiny_model_dir, tokenizer, engine_adapters, "graphs")
    st = graphs.stepper(StepLimits(max_rows=6, max_len=320, prefill_chunk=64, prefill_wait_steps=0, mixed=mixed))
    st.warmup()
    rng = random.Random(31)
    rows = {i: GenerationRow(_prompt(rng, rng.choice([3, 9, 20])), rng.choice([None, *ADAPTERS]),
                             SamplingParams(max_new_tokens=rng.randint(4, 16), logprobs=rng.choice([0, 2])))
            for i in range(10)}
    run = Run(st)
    pending = list(rows)
    while pending or st.rows():
        while pending and st.free_rows() and rng.random() < 0.5:
            i = pending.pop(0)
            run.add(i, rows[i])
        if st.rows():
            torch.cuda.set_sync_debug_mode("error")
            try:
                run.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert run.steps < 500
    d = st.describe()
    assert d["overlap"] and d["captures_after_warmup"] == 0 and d["prefill_replays"] == d["prefill_forwards"] > 0
    assert d["mixed"] is mixed and d["mixed_replays"] == d["mixed_steps"] and (d["mixed_steps"] > 0) is mixed
    for i, row in rows.items():
        assert run.tokens[i] == graphs.generate([row])[0].token_ids, i


def test_with_no_page_locked_memory_left_steps_copy_from_plain_memory(tiny_model_dir, tokenizer, engine_adapters,
                                                                     monkeypatch):
    """The host tier can take every page-locked byte. Then the step's host-to-device copies come from
    plain memory (they wait for the device; `pageable_copies` counts them) and rows still equal
    each row alone, instead of every step failing."""
    graphs = _engine(tiny_model_dir, tokenizer, engine_adapters, "graphs")
    st = graphs.stepper(StepLimits(max_rows=4, max_len=128, prefill_chunk=32, prefill_wait_steps=0))
    st.warmup()

    def no_pinned(self, *args, **kwargs):
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinned)
    rows = _schedule(12, 8)
    run, cancelled = _drive(st, rows, seed=13)
    monkeypatch.undo()
    assert st.describe()["pageable_copies"] > 0
    for i, row in rows.items():
        if i not in cancelled:
            assert run.tokens[i] == graphs.generate([row])[0].token_ids, i
