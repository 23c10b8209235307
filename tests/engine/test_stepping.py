"""Continuous batching (`handler.engine.stepping.Stepper` through `MultiLoraEngine.stepper`), eager on
the CPU, fp32: rows joining and leaving at random steps must each get exactly what
`engine.generate([row])` gives the row alone (tokens and finish reason), with log-probabilities
that match PEFT alone teacher-forced (`PeftOracle.token_logprobs`) within 1e-4.

Also: the decode of N rows is one model forward per step; long prompts are prefilled in chunks
without stalling running rows; `CacheFull` / `RowTooLong` / bad rows; KV rows free again after
finish or cancel; an adapter in use cannot be deleted; a new adapter loaded mid-run (vLLM #47724)
or a freed slot refilled does not change running rows; seeded sampling does not depend on batch mates.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from conftest import load_base
from handler.engine import (AdapterNotLoaded, CacheFull, EngineError, GenerationRow, RowTooLong, SamplingParams,
                            StepLimits, make_engine)
from handler.engine.settings import EngineSettings
from handler.engine.row_cache import RowCache
from handler.engine.stepping import Stepper, prefill_shapes
from loraplex_testing.oracle import PeftOracle

ADAPTERS = ["r4", "r8qv", "r16rs", "r16mlp"]
TOL = 1e-4
SP2 = SamplingParams(max_new_tokens=2)


def _engine(tiny_model_dir, tokenizer, engine_adapters, eos=None, decode="static", adapters=ADAPTERS, attn=None):
    model = load_base(tiny_model_dir)
    if attn is not None:
        model.config._attn_implementation = attn
    eng = make_engine("multilora", model, EngineSettings(num_slots=7, max_rank=64, decode=decode),
                      eos_token_ids=eos if eos is not None else [tokenizer.eos_token_id],
                      pad_token_id=tokenizer.pad_token_id)
    for name in adapters:
        eng.load_adapter(str(engine_adapters[name]), name)
    return eng


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, engine_adapters):
    return PeftOracle(tiny_model_dir, {n: engine_adapters[n] for n in ADAPTERS})


@pytest.fixture(scope="module")
def eng(tiny_model_dir, tokenizer, engine_adapters):
    return _engine(tiny_model_dir, tokenizer, engine_adapters)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 300) for _ in range(n)]


class Run:
    """Drives a stepper and collects each row's events (checking the per-step contract)."""

    def __init__(self, stepper):
        self.st = stepper
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.top: dict[int, list[tuple]] = {}
        self.finished: dict[int, str] = {}
        self.first_step: dict[int, int] = {}
        self.steps = 0

    def add(self, row_id, row):
        self.st.add(row_id, row)
        self.tokens[row_id], self.logprobs[row_id], self.top[row_id] = [], [], []

    def step(self):
        events = self.st.step()
        seen = [e.row_id for e in events]
        assert len(seen) == len(set(seen)), "a row got two events in one step"
        for e in events:
            assert e.row_id not in self.finished
            self.first_step.setdefault(e.row_id, self.steps)
            if e.token_id is None:
                assert e.finished == "stop" and e.logprob is None
            else:
                self.tokens[e.row_id].append(e.token_id)
                if e.logprob is not None:
                    self.logprobs[e.row_id].append(e.logprob)
                    self.top[e.row_id].append(e.top_logprobs)
            if e.finished:
                self.finished[e.row_id] = e.finished
        assert self.st.rows() + self.st.free_rows() == self.st.limits.max_rows
        self.steps += 1
        return events


def _check_logprobs(oracle, row, run, row_id):
    k = row.params.logprobs
    toks = run.tokens[row_id]
    if not k:
        assert run.logprobs[row_id] == [] and run.top[row_id] == []
        return
    assert len(run.logprobs[row_id]) == len(toks)
    if not toks:
        return
    want = oracle.token_logprobs(row.adapter, list(row.input_ids), toks)
    got = torch.tensor(run.logprobs[row_id])
    assert torch.allclose(got, want[torch.arange(len(toks)), torch.tensor(toks)], atol=TOL, rtol=0)
    for t, top in enumerate(run.top[row_id]):
        assert len(top) == k
        ref = want[t].topk(k)
        assert torch.allclose(torch.tensor([v for _, v in top]), ref.values, atol=TOL, rtol=0)
        # ids agree except where two alternatives tie within the tolerance
        for (i, v), ri in zip(top, ref.indices.tolist()):
            assert i == ri or abs(float(want[t, ri]) - v) < TOL


@pytest.mark.parametrize("overlap,mixed", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["sync", "overlap", "mixed", "overlap-mixed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_schedule_rows_equal_each_row_alone(tiny_model_dir, tokenizer, engine_adapters, oracle, seed, overlap,
                                                   mixed):
    """Rows added at random steps (random prompt lengths, some longer than prefill_chunk, random
    adapters incl. the base, random max_new_tokens and logprobs), some cancelled mid-run, KV rows
    reused many times; an extra EOS id makes some rows stop early. With overlap (the GPU default,
    forced here on the CPU: the same bookkeeping) every event comes one step late, an EOS row runs
    one step past its end, and a cancelled row's queued step is dropped. Mixed (the GPU default,
    forced here): joining rows' prompt chunks run in the decode steps' forwards, through
    `mixed_attention`, in chunks of up to `mixed_tokens` split over 1, 2 or 4 rows."""
    rng = random.Random(seed)
    rows = {}
    for i in range(16):
        rows[i] = GenerationRow(_prompt(rng, rng.choice([1, 2, 5, 9, 13, 20, 31, 44])), rng.choice([None, *ADAPTERS]),
                                SamplingParams(max_new_tokens=rng.randint(1, 14), logprobs=rng.choice([0, 0, 1, 4])))
    probe = _engine(tiny_model_dir, tokenizer, engine_adapters).generate(list(rows.values()))
    common = Counter(t for o in probe for t in o.token_ids[1:]).most_common(1)[0][0]
    eos = [tokenizer.eos_token_id, common]  # a token the rows do emit after their first
    eng = _engine(tiny_model_dir, tokenizer, engine_adapters, eos=eos)
    limits = StepLimits(max_rows=4, max_len=80, prefill_chunk=12, overlap=overlap, mixed=mixed, mixed_tokens=10)
    run = Run(eng.stepper(limits))
    assert run.st.overlap is overlap and run.st.mixed is mixed
    st = run.st
    pending = list(rows)
    cancelled: set[int] = set()
    kv_rows_seen = set()
    full_refusals = 0
    while pending or st.rows():
        if pending and rng.random() < 0.6:
            for _ in range(rng.randint(1, 3)):
                if not pending:
                    break
                if st.free_rows() == 0:
                    with pytest.raises(CacheFull):
                        st.add(pending[0], rows[pending[0]])
                    full_refusals += 1
                    break
                rid = pending.pop(0)
                run.add(rid, rows[rid])
                kv_rows_seen.add(st._rows[rid].kv)
        running = [r for r in st._rows]
        if running and rng.random() < 0.07:
            victim = rng.choice(running)
            st.cancel(victim)
            cancelled.add(victim)
            assert victim not in st._rows
        if st.rows():
            run.step()
        assert run.steps < 500
    assert st.free_rows() == limits.max_rows and st.kv_utilisation() == 0.0
    assert full_refusals > 0 and kv_rows_seen == set(range(limits.max_rows))  # rows waited; KV rows were reused
    assert any(len(rows[i].input_ids) > limits.prefill_chunk for i in run.finished)

    alone = {i: eng.generate([rows[i]])[0] for i in rows}
    for i, row in rows.items():
        if i in cancelled:
            assert i not in run.finished
            assert run.tokens[i] == alone[i].token_ids[: len(run.tokens[i])]
            continue
        assert run.finished[i] == alone[i].finish_reason, i
        assert run.tokens[i] == alone[i].token_ids, i
        _check_logprobs(oracle, row, run, i)
    assert {"stop", "length"} <= set(run.finished.values())
    assert (st.past_end > 0) is overlap  # EOS rows (and cancelled ones) ran a step nobody reads
    # describe's occupancy: every KV row counted once per step, in one state
    assert sum(st.row_steps.values()) == limits.max_rows * st.steps
    assert min(st.row_steps[k] for k in ("decoding", "joining", "free")) > 0
    assert (st.row_steps["ending"] > 0) is overlap  # rows ended by length, not delivered yet
    # mixed: some decode steps carried chunks, of several rows at once, some completing a prompt there
    assert (st.mixed_steps > 0) is mixed and (st.mixed_prompt_tokens > 0) is mixed
    assert st.mixed_steps <= st.decode_steps


def test_decode_of_many_rows_is_one_forward_per_step(eng):
    st = eng.stepper(StepLimits(max_rows=8, max_len=64, prefill_chunk=64))
    calls = []
    hook = eng.model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                                     with_kwargs=True)
    try:
        rng = random.Random(5)
        for i, a in enumerate([None, "r4", "r8qv", "r16rs", "r16mlp"]):
            st.add(i, GenerationRow(_prompt(rng, 3 + i), a, SamplingParams(max_new_tokens=10)))
        calls.clear()
        assert len(st.step()) == 5  # one prefill forward for all five prompts (3..7 tokens), no decode yet
        assert calls == [(5, 7)]
        for _ in range(4):
            calls.clear()
            assert len(st.step()) == 5
            assert calls == [(5, 1)]  # all five rows, whatever their adapters: ONE forward
        st.add(9, GenerationRow(_prompt(rng, 7), None, SamplingParams(max_new_tokens=3)))
        calls.clear()
        events = st.step()
        assert calls == [(1, 7), (5, 1)]  # the joining row's prefill (its first token), then the one decode
        assert sorted(e.row_id for e in events) == [0, 1, 2, 3, 4, 9]
        calls.clear()
        assert len(st.step()) == 6
        assert calls == [(6, 1)]  # from now on it decodes with the others
    finally:
        hook.remove()
        for i in [0, 1, 2, 3, 4, 9]:
            st.cancel(i)
    assert st.rows() == 0


def test_a_row_leaving_below_others_leaves_no_dummy_row_in_the_decode_batch(eng):
    """`Stepper._compact`: when rows 0 and 1 finish, the two rows above move down into their KV rows
    (keys and values copied once), so the next decode forward has 2 rows, not 4 with 2 dummies, and
    the moved rows' tokens still equal each row alone."""
    st = eng.stepper(StepLimits(max_rows=4, max_len=64, prefill_chunk=64))
    rng = random.Random(11)
    rows = {i: GenerationRow(_prompt(rng, 4 + i), a, SamplingParams(max_new_tokens=n))
            for i, (a, n) in enumerate([("r4", 2), (None, 3), ("r8qv", 12), ("r16mlp", 9)])}
    calls = []
    hook = eng.model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                                     with_kwargs=True)
    run = Run(st)
    try:
        for i, row in rows.items():
            run.add(i, row)
        while st.rows():
            calls.clear()
            run.step()
            if run.steps == 4:  # rows 0 and 1 have left (2 and 3 new tokens)
                assert sorted(r.kv for r in st._rows.values()) == [0, 1] and st.rows_moved == 2
                assert calls == [(2, 1)], calls  # the decode ran over 2 rows: no dummy for a hole
    finally:
        hook.remove()
    for i, row in rows.items():
        assert run.tokens[i] == eng.generate([row])[0].token_ids, i


def test_long_prompt_is_prefilled_in_chunks_without_stalling_running_rows(eng):
    st = eng.stepper(StepLimits(max_rows=4, max_len=96, prefill_chunk=10))
    run = Run(st)
    rng = random.Random(7)
    short = GenerationRow(_prompt(rng, 4), "r4", SamplingParams(max_new_tokens=12))
    long = GenerationRow(_prompt(rng, 37), "r16rs", SamplingParams(max_new_tokens=5))
    run.add(0, short)
    run.step()
    run.add(1, long)
    for _ in range(4):
        events = run.step()
        assert [e.row_id for e in events if e.row_id == 0] == [0]  # the running row gets a token every step
    assert run.first_step[1] == 4  # 37 tokens at 10 per step: the 4th step after joining completes it
    while st.rows():
        run.step()
    assert run.tokens[0] == eng.generate([short])[0].token_ids
    assert run.tokens[1] == eng.generate([long])[0].token_ids


def test_prefill_budget_is_shared_by_joining_rows(eng):
    st = eng.stepper(StepLimits(max_rows=4, max_len=64, prefill_chunk=8))
    calls = []
    hook = eng.model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                                     with_kwargs=True)
    try:
        rng = random.Random(8)
        st.add(0, GenerationRow(_prompt(rng, 5), None, SamplingParams(max_new_tokens=4)))
        st.add(1, GenerationRow(_prompt(rng, 6), None, SamplingParams(max_new_tokens=4)))
        st.add(2, GenerationRow(_prompt(rng, 2), None, SamplingParams(max_new_tokens=4)))
        st.add(3, GenerationRow(_prompt(rng, 30), None, SamplingParams(max_new_tokens=4)))
        events = st.step()
        assert calls == [(2, 5)] and [e.row_id for e in events] == [0]  # row 0's 5 + row 1's first 3 of 6
        calls.clear()
        events = st.step()
        assert calls == [(3, 3), (1, 1)]  # row 1's rest, row 2, row 3's first 3; then row 0's decode
        assert sorted(e.row_id for e in events) == [0, 1, 2]
        calls.clear()
        st.step()
        assert calls == [(1, 8), (3, 1)]  # row 3 alone (8 of its 27 left), then rows 0-2 decode
    finally:
        hook.remove()
        for i in range(4):
            st.cancel(i)


def test_cache_full_then_free_after_finish_and_cancel(eng):
    st = eng.stepper(StepLimits(max_rows=2, max_len=32, prefill_chunk=16))
    row = GenerationRow([5, 6, 7], None, SamplingParams(max_new_tokens=2))
    st.add(0, row)
    st.add(1, GenerationRow([8, 9], "r4", SamplingParams(max_new_tokens=20)))
    assert st.free_rows() == 0 and st.rows() == 2
    with pytest.raises(CacheFull):
        st.add(2, row)
    assert st.rows() == 2
    st.step()
    st.step()  # row 0 finished ("length" after 2 tokens): its KV row is free when step returns
    assert st.rows() == 1 and st.free_rows() == 1 and st.kv_utilisation() > 0
    st.add(2, row)
    with pytest.raises(CacheFull):
        st.add(3, row)
    st.cancel(1)
    st.cancel(1)  # unknown now: a no-op
    st.cancel(12345)
    assert st.free_rows() == 1 and st.uses("r4") == 0
    st.add(3, row)
    st.cancel(2)
    st.cancel(3)
    assert st.rows() == 0 and st.free_rows() == 2 and st.step() == []


def test_refusals(eng):
    st = eng.stepper(StepLimits(max_rows=2, max_len=16, prefill_chunk=16))
    with pytest.raises(RowTooLong):
        st.add(0, GenerationRow(list(range(3, 13)), None, SamplingParams(max_new_tokens=7)))
    st.add(0, GenerationRow(list(range(3, 13)), None, SamplingParams(max_new_tokens=6)))  # exactly fits
    with pytest.raises(EngineError, match="already running"):
        st.add(0, GenerationRow([3], None, SP2))
    with pytest.raises(AdapterNotLoaded):
        st.add(1, GenerationRow([3], "nope", SP2))
    with pytest.raises(EngineError, match="row 1: empty prompt"):
        st.add(1, GenerationRow([], None, SP2))
    with pytest.raises(EngineError, match="temperature"):
        st.add(1, GenerationRow([3], None, SamplingParams(max_new_tokens=2, do_sample=True, temperature=0)))
    with pytest.raises(EngineError, match="logprobs"):
        st.add(1, GenerationRow([3], None, SamplingParams(max_new_tokens=2, logprobs=99)))
    with pytest.raises(EngineError, match="token ids"):
        st.add(1, GenerationRow([3, 10 ** 6], None, SP2))
    assert st.rows() == 1 and st.free_rows() == 1  # nothing refused took a KV row
    st.cancel(0)
    with pytest.raises(EngineError):
        StepLimits(max_rows=4, graph_batch_sizes=(1, 8))


def test_delete_adapter_refused_while_rows_use_it(tiny_model_dir, tokenizer, engine_adapters):
    eng = _engine(tiny_model_dir, tokenizer, engine_adapters)
    st = eng.stepper(StepLimits(max_rows=3, max_len=32, prefill_chunk=8))
    st.add(0, GenerationRow([5] * 12, "r4", SamplingParams(max_new_tokens=2)))  # still prefilling after one step
    st.add(1, GenerationRow([5, 6], "r4", SamplingParams(max_new_tokens=9)))
    assert st.uses("r4") == 2 and st.uses("r8qv") == 0
    with pytest.raises(EngineError, match="in use"):
        eng.delete_adapter("r4")
    eng.delete_adapter("r8qv")  # not in use: fine
    st.step()
    st.cancel(1)
    with pytest.raises(EngineError, match="in use"):
        eng.delete_adapter("r4")
    while st.rows():
        st.step()
    assert st.uses("r4") == 0
    eng.delete_adapter("r4")
    assert "r4" not in eng.get_model_status()["loaded_adapters"]


def test_new_adapters_mid_run_do_not_change_running_rows(tiny_model_dir, tokenizer, engine_adapters):
    """vLLM #47724: a row served with another adapter after a runtime load. Here rows run while a
    new adapter is loaded into a free slot, and while another one is deleted and its slot refilled."""
    eng = _engine(tiny_model_dir, tokenizer, engine_adapters, adapters=["r4", "r8qv"])
    rng = random.Random(11)
    rows = {0: GenerationRow(_prompt(rng, 6), "r4", SamplingParams(max_new_tokens=14, logprobs=2)),
            1: GenerationRow(_prompt(rng, 9), None, SamplingParams(max_new_tokens=14))}
    want = {i: eng.generate([r])[0] for i, r in rows.items()}
    run = Run(eng.stepper(StepLimits(max_rows=4, max_len=48, prefill_chunk=16)))
    for i, r in rows.items():
        run.add(i, r)
    run.step()
    run.step()
    eng.load_adapter(str(engine_adapters["r16rs"]), "r4@v2")  # a new version beside the running one
    rows[2] = GenerationRow(rows[0].input_ids, "r4@v2", SamplingParams(max_new_tokens=10))
    run.add(2, rows[2])
    run.step()
    eng.delete_adapter("r8qv")  # unused: its slot is freed and refilled by another adapter
    eng.load_adapter(str(engine_adapters["r16mlp"]), "other")
    rows[3] = GenerationRow(_prompt(rng, 5), "other", SamplingParams(max_new_tokens=6))
    run.add(3, rows[3])
    while run.st.rows():
        run.step()
    for i in (0, 1):
        assert run.tokens[i] == want[i].token_ids
    assert run.logprobs[0] == pytest.approx(want[0].token_logprobs, abs=TOL)
    for i in (2, 3):
        assert run.tokens[i] == eng.generate([rows[i]])[0].token_ids
    assert run.tokens[2] != run.tokens[0][:len(run.tokens[2])]  # the new version really differs


def test_seeded_sampled_row_does_not_depend_on_batch_mates(eng):
    rng = random.Random(13)
    prompt = _prompt(rng, 7)
    sampled = GenerationRow(prompt, "r16rs", SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.5,
                                                            top_p=0.95, seed=1234, logprobs=3))

    def run_with(mates):
        run = Run(eng.stepper(StepLimits(max_rows=6, max_len=48, prefill_chunk=5)))
        for j, m in enumerate(mates[:2]):
            run.add(10 + j, m)
        run.step()
        run.add(0, sampled)
        for j, m in enumerate(mates[2:]):
            run.step()
            run.add(20 + j, m)
        while run.st.rows():
            run.step()
        return run.tokens[0], run.logprobs[0]

    alone = run_with([])
    mates = [GenerationRow(_prompt(rng, n), a, SamplingParams(max_new_tokens=9, do_sample=s, temperature=0.8))
             for n, a, s in [(3, None, True), (11, "r4", False), (6, "r8qv", True), (2, "r16mlp", False)]]
    busy = run_with(mates)
    assert busy[0] == alone[0]
    assert busy[1] == pytest.approx(alone[1], abs=TOL)
    other_seed = GenerationRow(prompt, "r16rs", SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.5,
                                                               top_p=0.95, seed=4321))
    st = eng.stepper(StepLimits(max_rows=6, max_len=48, prefill_chunk=5))
    run = Run(st)
    run.add(0, other_seed)
    while st.rows():
        run.step()
    assert run.tokens[0] != alone[0]  # the seed matters (the test can fail)
    # and the same draws as `generate` alone under that seed (its global-RNG path, same warpers)
    assert alone[0] == eng.generate([sampled])[0].token_ids


@pytest.mark.parametrize("attn", ["eager"])
def test_eager_attention_equals_generate(tiny_model_dir, tokenizer, engine_adapters, attn):
    eng = _engine(tiny_model_dir, tokenizer, engine_adapters, attn=attn)
    rng = random.Random(17)
    rows = {i: GenerationRow(_prompt(rng, n), a, SamplingParams(max_new_tokens=8))
            for i, (n, a) in enumerate([(3, None), (17, "r4"), (8, "r16mlp")])}
    run = Run(eng.stepper(StepLimits(max_rows=2, max_len=40, prefill_chunk=6)))
    pending = list(rows)
    while pending or run.st.rows():
        if pending and run.st.free_rows():
            i = pending.pop(0)
            run.add(i, rows[i])
        run.step()
    for i, r in rows.items():
        assert run.tokens[i] == eng.generate([r])[0].token_ids


def test_describe_warmup_and_status(eng, tiny_model_dir, tokenizer, engine_adapters):
    limits = StepLimits(max_rows=3, max_len=40, prefill_chunk=8)
    st = eng.stepper(limits)
    assert eng.stepper(limits) is st
    st.warmup()  # CPU: nothing to capture
    st.add(0, GenerationRow([4, 5, 6], None, SamplingParams(max_new_tokens=4)))
    with pytest.raises(EngineError, match="rows running"):
        eng.stepper(StepLimits(max_rows=2, max_len=40))
    st.step()
    d = eng.get_model_status()["stepper"]
    assert {"captures", "captures_after_warmup", "buckets", "rows", "max_rows", "max_len", "kv_utilisation",
            "steps"} <= set(d)
    assert d["captures"] == d["captures_after_warmup"] == 0 and d["graphs"] is False
    assert d["rows"] == 1 and d["max_rows"] == 3 and d["kv_utilisation"] == pytest.approx(3 / 120)
    st.cancel(0)
    assert eng.stepper(StepLimits(max_rows=2, max_len=40)) is not st  # idle: rebuilt with the new limits


def test_peft_engine_has_no_stepper(tiny_model_dir, tokenizer):
    eng = make_engine("peft", load_base(tiny_model_dir), EngineSettings(decode="generate"),
                      eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(EngineError, match="multilora"):
        eng.stepper(StepLimits())


class _EagerGraph:
    """Stands in for a captured CUDA graph: each replay runs the captured step's forward again,
    on the same static tensors, under the same `static_batch` (the slot tensor the kernels read)."""

    def __init__(self, st, g):
        self.st, self.g = st, g

    def replay(self):
        with self.st._static(self.g):
            self.g.logits = self.g.forward(self.st)


class EmulatedGraphs(Stepper):
    """The `graphs` decode and prefill paths (batch/key-length/rank buckets, dummy rows padding a
    batch up to its bucket, prefill chunks padded to captured (rows, tokens) shapes with spare rows
    writing the scratch KV row, one input tensor per graph, LoRA slots read from a tensor by the
    Triton kernels, here through Triton's interpreter) on the CPU: only the capture itself is replaced."""

    def __init__(self, *args, ranks, fail_batch=None, fail_prefill_rows=None, **kw):
        super().__init__(*args, **kw)
        self.graphs = True
        self.graph_ranks = list(ranks)
        self._prefill_shapes = prefill_shapes(self.limits)
        self.cache = RowCache(len(self.cache.layers), self.limits.max_rows, self.limits.max_len,
                              spare_rows=1)
        self.fail_batch = fail_batch  # captures of this decode batch bucket raise (as an OOM would)
        self.fail_prefill_rows = fail_prefill_rows  # and of prefill shapes of this many rows

    def _rank_of(self, slot):  # `decode_rank` answers None off CUDA; the same rule by hand
        r = max((lay.slot_rank[slot] for lay in self.lora.lora_layers.values()), default=0) if slot else 0
        return next(b for b in self.graph_ranks if b >= r)

    def _capture(self, g):
        size, failing = (g.batch, self.fail_batch) if hasattr(g, "batch") else (g.rows, self.fail_prefill_rows)
        if size == failing:
            raise torch.OutOfMemoryError("emulated")
        g.graph = _EagerGraph(self, g)
        self.captures += 1


@pytest.mark.parametrize("fail_batch,fail_prefill_rows", [(None, None), (4, 2)])
def test_bucketed_graph_path_emulated_on_cpu_equals_rows_alone(tiny_model_dir, tokenizer, engine_adapters, fail_batch,
                                                               fail_prefill_rows):
    """fail_*: those buckets' captures fail at warmup; their steps run eagerly, rows unaffected."""
    pytest.importorskip("triton")
    eng = _engine(tiny_model_dir, tokenizer, engine_adapters, adapters=["r4", "r16rs", "r64"])
    limits = StepLimits(max_rows=5, max_len=300, prefill_chunk=40, graph_batch_sizes=(2, 4), prefill_wait_steps=0)
    st = EmulatedGraphs(eng.model.model, limits, lora=eng.model, eos_token_ids=eng.eos_token_ids,
                        pad_token_id=eng.pad_token_id, ranks=[16, 64], fail_batch=fail_batch,
                        fail_prefill_rows=fail_prefill_rows)
    # prefill: rows 1, 2, 4 (<= max_rows 5) x tokens 16, 32, 64 (the chunk 40 rounded up) x keys 256, 300
    assert prefill_shapes(limits) == [(n, t) for n in (1, 2, 4) for t in (16, 32, 64)]
    st.warmup()
    failed = 0 if fail_batch is None else 2 * 2 + 3 * 2
    assert st.captures == 3 * 2 * 2 + 9 * 2 - failed  # decode: batch 2, 4, 5 (max_rows) x keys 256, 300 x ranks 16, 64
    assert st.describe()["capture_failures"] == failed
    rng = random.Random(23)
    rows = {i: GenerationRow(_prompt(rng, n), a, SamplingParams(max_new_tokens=m, logprobs=1))
            for i, (n, a, m) in enumerate([(3, "r4", 9), (25, None, 5), (2, "r64", 8), (14, "r16rs", 7),
                                           (5, None, 6), (266, "r4", 6), (8, "r64", 5)])}
    run = Run(st)
    pending = list(rows)
    waves = {0: 2, 3: 3}  # at step 3 three rows join while two decode: a 4-row prefill shape with a padding row
    while pending or st.rows():
        for _ in range(waves.get(run.steps, 1 if run.steps > 3 else 0)):
            if pending and st.free_rows():
                i = pending.pop(0)
                run.add(i, rows[i])
        run.step()
    d = st.describe()
    replays = sum(b["replays"] for b in d["buckets"])
    assert d["captures_after_warmup"] == 0 and d["capture_failures"] == failed
    assert d["decode_steps"] == replays if fail_batch is None else d["decode_steps"] > replays
    prefilled = {(b["rows"], b["tokens"], b["kv_len"]) for b in d["prefill_buckets"] if b["replays"]}
    assert d["prefill_replays"] == sum(b["replays"] for b in d["prefill_buckets"]) > 0
    assert {n for n, _, _ in prefilled} >= {1, 4}, prefilled
    if fail_prefill_rows is None:  # every chunk fits a captured shape and key length
        assert d["prefill_replays"] == d["prefill_forwards"] and {k for _, _, k in prefilled} == {256, 300}
    else:
        assert fail_prefill_rows not in {n for n, _, _ in prefilled} and d["prefill_forwards"] > d["prefill_replays"]
    served = {(b["batch"], b["kv_len"], b["rank"]) for b in d["buckets"] if b["replays"]}
    assert {b for b, _, _ in served} >= {2, 4} - {fail_batch} and {r for _, _, r in served} == {16, 64}
    assert {k for _, k, _ in served} == {256, 300}
    for i, row in rows.items():
        want = eng.generate([row])[0]
        assert run.tokens[i] == want.token_ids, i
        assert run.logprobs[i] == pytest.approx(want.token_logprobs, abs=TOL), i


def test_joining_rows_wait_to_be_prefilled_together_only_with_graphs(tiny_model_dir, tokenizer, engine_adapters):
    """`Stepper._defer_prefill`: with graph-replayed decode steps (here only the flag; the GPU tests run
    the graphs) a short joining prompt waits up to prefill_wait_steps steps while others decode;
    it starts at once when the waiting prompts fill a chunk or a prompt is part-way in, and waits
    even with every KV row taken (rows that end free theirs for more to join); eagerly (graphs
    off) it never waits."""
    from handler.engine.stepping import Stepper

    eng = make_engine("multilora", load_base(tiny_model_dir, torch.float32, "cpu"),
                      EngineSettings(num_slots=4, max_rank=64, decode="static"),
                      eos_token_ids=[], pad_token_id=tokenizer.pad_token_id)
    st: Stepper = eng.stepper(StepLimits(max_rows=3, max_len=128, prefill_chunk=40, prefill_wait_steps=3))

    def defers() -> bool:
        st.graphs = True  # only the flag: rows are added with it off (add resolves rank buckets by it)
        try:
            return st._defer_prefill()
        finally:
            st.graphs = False

    st.add(0, GenerationRow([5, 6, 7], None, SamplingParams(max_new_tokens=50)))
    st.step()
    assert not defers()  # nothing is waiting
    st.add(1, GenerationRow([8, 9], None, SamplingParams(max_new_tokens=5)))
    assert not st._defer_prefill()  # eager: never waits
    assert defers()  # joined this step: waits
    st.steps += 3
    assert not defers()  # waited prefill_wait_steps
    st.steps -= 3
    st.add(2, GenerationRow(list(range(3, 43)), None, SamplingParams(max_new_tokens=5)))
    assert not defers()  # the waiting prompts fill a chunk (and no KV row is free)
    st.cancel(2)
    st.add(2, GenerationRow([10, 11], None, SamplingParams(max_new_tokens=5)))
    assert not st.free_rows()
    assert defers()  # no KV row free: still waits (a row that ends frees one for another join)
    st.cancel(2)
    assert defers()
    st._rows[1].filled = 1
    assert not defers()  # part-way prefilled: its next chunk runs at once


def test_pack_groups_cpu_chunks_only_while_padding_costs_less_than_a_forward():
    """`stepping._pack`: eagerly on a CPU (``spare`` = a forward's fixed cost in tokens) a chunk joins a
    forward only while its padding stays within ``spare`` tokens per chunk beyond the first; on a GPU
    (no ``spare``) padding may double a forward, or fill it up to ``floor``."""
    from handler.engine.stepping import _pack

    def shapes(chunks, **kw):
        return [[n for _, n in g] for g in _pack([(i, n) for i, n in enumerate(chunks)], **kw)]

    assert shapes([64, 64], spare=16) == [[64, 64]]
    assert shapes([64, 128], spare=16) == [[128], [64]]  # 64 tokens of padding to save one forward: apart
    assert shapes([40, 48, 40], spare=16) == [[48, 40, 40]]  # 16 tokens of padding saves two forwards
    assert shapes([48, 30, 30], spare=16) == [[48], [30, 30]]  # 18 padding for one forward saved: too much
    assert shapes([64, 128]) == [[128, 64]]  # GPU rule: padding at most doubles the forward
    assert shapes([500, 12, 12]) == [[500, 12], [12]]  # a third row would pad 1500 for 524 real tokens
    assert shapes([500, 12, 12], floor=1536) == [[500, 12, 12]]
