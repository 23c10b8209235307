"""Per-token log-probabilities (`SamplingParams.logprobs`) through every decode path, against
PEFT alone on each row: teacher-forced over prompt + the engine's own tokens, log_softmax of
the raw logits at each position (`PeftOracle.token_logprobs`), fp32, within 1e-4.

Also: asking changes no row's tokens, rows that did not ask get None, the EOS and what follows
it are stripped with their log-probabilities, and nobody pays when no row asks.
"""
from __future__ import annotations

import pytest
import torch

from conftest import load_base
from handler.engine import EngineError, GenerationRow, SamplingParams, make_engine
from handler.engine.settings import EngineSettings
from loraplex_testing.oracle import PeftOracle

ADAPTERS = ["r4", "r8qv", "r16rs", "r16mlp"]
TOL = 1e-4
# (engine kind, decode mode)
PATHS = [("multilora", "generate"), ("multilora", "static"), ("peft", "generate")]


def _engine(kind, decode, tiny_model_dir, tokenizer, engine_adapters, eos=None, device="cpu"):
    eng = make_engine(kind, load_base(tiny_model_dir, device=device),
                      EngineSettings(num_slots=6, max_rank=64, decode=decode),
                      eos_token_ids=eos if eos is not None else [tokenizer.eos_token_id],
                      pad_token_id=tokenizer.pad_token_id)
    for name in ADAPTERS:
        eng.load_adapter(str(engine_adapters[name]), name)
    return eng


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, engine_adapters):
    return PeftOracle(tiny_model_dir, {n: engine_adapters[n] for n in ADAPTERS})


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(3, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _rows(logprobs: bool) -> list[GenerationRow]:
    """A mixed batch: greedy rows of several adapters and the base with k = 5, 1, 20 or none,
    a seeded sampled row (temperature 1.7, top-p 0.9) with k = 3, an unseeded sampled row."""
    p = _prompts(8, seed=1)

    def sp(k, **kw):
        return SamplingParams(logprobs=k if logprobs else 0, **kw)

    return [GenerationRow(p[0], "r4", sp(5, max_new_tokens=8)),
            GenerationRow(p[1], None, sp(1, max_new_tokens=6)),
            GenerationRow(p[2], "r8qv", sp(0, max_new_tokens=8)),
            GenerationRow(p[3], "r16rs", sp(20, max_new_tokens=5)),
            GenerationRow(p[4], None, sp(0, max_new_tokens=7)),
            GenerationRow(p[5], "r16mlp", sp(5, max_new_tokens=8)),
            GenerationRow(p[6], "r4", sp(3, max_new_tokens=9, do_sample=True, temperature=1.7, top_p=0.9,
                                         seed=77)),
            GenerationRow(p[7], "r16rs", sp(0, max_new_tokens=6, do_sample=True, temperature=1.3))]


def check_against_oracle(oracle, row, out, tol=TOL):
    """`out`'s log-probabilities are PEFT's, teacher-forced on `out`'s tokens, for `row`'s adapter."""
    k = row.params.logprobs
    n = len(out.token_ids)
    assert out.token_logprobs is not None and out.top_logprobs is not None
    assert len(out.token_logprobs) == n and len(out.top_logprobs) == n
    want = oracle.token_logprobs(row.adapter, row.input_ids, out.token_ids)
    for t, (tok, got, top) in enumerate(zip(out.token_ids, out.token_logprobs, out.top_logprobs)):
        assert abs(got - float(want[t, tok])) <= tol, (t, got, float(want[t, tok]))
        assert len(top) == k
        ids = [i for i, _ in top]
        vals = torch.tensor([v for _, v in top])
        assert len(set(ids)) == k and torch.all(vals[:-1] >= vals[1:])  # distinct, most likely first
        # each alternative's value is PEFT's for that token, and they are PEFT's k largest (ties may reorder ids)
        assert torch.allclose(vals, want[t, ids], atol=tol, rtol=0), t
        assert torch.allclose(vals, want[t].topk(k).values, atol=tol, rtol=0), t
        if not row.params.do_sample:  # greedy: the chosen token is the top-1
            assert tok == ids[0] and abs(got - top[0][1]) <= tol, t


@pytest.mark.parametrize("kind,decode", PATHS)
def test_mixed_batch_logprobs_equal_peft_alone(kind, decode, tiny_model_dir, tokenizer, engine_adapters, oracle):
    eng = _engine(kind, decode, tiny_model_dir, tokenizer, engine_adapters)
    rows, plain_rows = _rows(True), _rows(False)
    torch.manual_seed(5)  # the unseeded sampled row draws from the global RNG: same state for both runs
    got = eng.generate(rows)
    torch.manual_seed(5)
    plain = eng.generate(plain_rows)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]  # asking changes nobody's tokens
    assert [o.finish_reason for o in got] == [o.finish_reason for o in plain]
    assert all(o.token_logprobs is None and o.top_logprobs is None for o in plain)
    for row, out in zip(rows, got):
        if row.params.logprobs:
            check_against_oracle(oracle, row, out)
        else:
            assert out.token_logprobs is None and out.top_logprobs is None
    # the sampled row at temperature 1.7 really reports the untempered distribution, and it sampled
    # something other than the greedy answer at some step (else the check above proves little)
    sampled = got[6]
    assert sampled.token_ids != oracle.greedy("r4", rows[6].input_ids, 9)[:len(sampled.token_ids)]


@pytest.mark.parametrize("kind,decode", PATHS)
def test_eos_and_its_logprob_are_stripped(kind, decode, tiny_model_dir, tokenizer, engine_adapters, oracle):
    prompts = _prompts(3, seed=4)
    probe = oracle.greedy("r16rs", prompts[0], 12)
    eos = probe[3]
    cut = probe.index(eos)
    eng = _engine(kind, decode, tiny_model_dir, tokenizer, engine_adapters, eos=[eos])
    rows = [GenerationRow(prompts[0], "r16rs", SamplingParams(max_new_tokens=12, logprobs=2)),
            GenerationRow(prompts[1], None, SamplingParams(max_new_tokens=12, logprobs=4)),
            GenerationRow(prompts[2], "r4", SamplingParams(max_new_tokens=12))]
    out = eng.generate(rows)
    assert out[0].finish_reason == "stop" and out[0].token_ids == probe[:cut]
    assert len(out[0].token_logprobs) == len(out[0].top_logprobs) == cut
    for row, o in zip(rows[:2], out[:2]):
        check_against_oracle(oracle, row, o)
    assert out[2].token_logprobs is None


@pytest.mark.parametrize("k", [-1, 21, True, 2.0])
def test_bad_logprobs_are_refused(k, tiny_model_dir, tokenizer, engine_adapters):
    eng = _engine("multilora", "generate", tiny_model_dir, tokenizer, engine_adapters)
    with pytest.raises(EngineError, match="row 1: logprobs must be an integer from 0 to 20"):
        eng.generate([GenerationRow([5, 6], None), GenerationRow([5, 6], None, SamplingParams(logprobs=k))])


def test_no_logprob_work_when_no_row_asks(tiny_model_dir, tokenizer, engine_adapters, monkeypatch):
    """generate is called without output_logits, and the static loop builds no recorder."""
    import handler.engine.static_decode as static_decode

    rows = [GenerationRow(p, a, SamplingParams(max_new_tokens=4)) for p, a in zip(_prompts(3, seed=6),
                                                                                  ["r4", None, "r8qv"])]
    for kind in ("multilora", "peft"):
        eng = _engine(kind, "generate", tiny_model_dir, tokenizer, engine_adapters)
        target = eng.model.model if kind == "multilora" else eng.peft_model
        calls = []
        real = target.generate
        monkeypatch.setattr(target, "generate", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
        eng.generate(rows)
        assert calls and not any("output_logits" in kw or "return_dict_in_generate" in kw for kw in calls)
        eng.generate([GenerationRow([5, 6, 7], "r4", SamplingParams(max_new_tokens=2, logprobs=1))])
        assert calls[-1].get("output_logits") is True  # the probe sees the flag when a row asks

    def no_recorder(*a, **k):
        raise AssertionError("a Recorder was built though no row asked")

    monkeypatch.setattr(static_decode, "Recorder", no_recorder)
    eng = _engine("multilora", "static", tiny_model_dir, tokenizer, engine_adapters)
    assert all(o.token_logprobs is None for o in eng.generate(rows))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_logprobs_equal_peft_alone(tiny_model_dir, tokenizer, engine_adapters, oracle):
    """``graphs``: the captured step is unchanged; log-probabilities come from its logits output.
    fp32 on the GPU against the CPU oracle (TF32 off), a looser bound for the device's arithmetic."""
    torch.backends.cuda.matmul.allow_tf32 = False
    eng = _engine("multilora", "graphs", tiny_model_dir, tokenizer, engine_adapters, device="cuda")
    rows, plain_rows = _rows(True), _rows(False)
    got = eng.generate(rows)
    assert eng.fallbacks == 0 and eng.decoder.captures >= 1
    torch.manual_seed(5)
    plain = eng.generate(plain_rows)
    for row, out, ref in zip(rows, got, plain):
        if row.params.logprobs:
            check_against_oracle(oracle, row, out, tol=1e-3)
        else:
            assert out.token_logprobs is None
        if row.params.seed is not None or not row.params.do_sample:
            assert out.token_ids == ref.token_ids


def test_static_loop_reads_a_replayed_steps_output_buffer_in_time(tiny_model_dir, tokenizer, engine_adapters,
                                                                 oracle, monkeypatch):
    """The CPU stand-in for ``graphs``: every step's logits land in ONE buffer that the next step
    overwrites, as a replayed graph's static output does; the log-probabilities must be the same."""
    from handler.engine.static_decode import StaticDecoder

    eng = _engine("multilora", "static", tiny_model_dir, tokenizer, engine_adapters)
    rows = [r for r in _rows(True) if r.params.seed is not None or not r.params.do_sample]
    want = eng.generate(rows)
    eager = StaticDecoder._stepper

    def replay_like(self, st, slots, graphs):
        step = eager(self, st, slots, graphs)
        buf: list[torch.Tensor] = []

        def replay():
            out = step()
            if not buf:
                buf.append(torch.empty_like(out))
            buf[0].copy_(out)
            return buf[0]
        return replay

    monkeypatch.setattr(StaticDecoder, "_stepper", replay_like)
    got = eng.generate(rows)
    assert got == want
    for row, out in zip(rows, got):
        if row.params.logprobs:
            check_against_oracle(oracle, row, out)
