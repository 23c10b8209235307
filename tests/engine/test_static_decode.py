"""The static-cache decode loop (`handler.engine.static_decode`), run eagerly on the CPU.

On a GPU the same loop replays each decode step from a CUDA graph
(tests/engine/test_gpu.py); here it must give exactly what transformers'
`generate` gives (fp32): greedy tokens per row whatever the padding, batch
bucket, prompt lengths or EOS, and the same seeded samples.
"""
from __future__ import annotations

import pytest
import torch

from conftest import load_base
from handler.engine import EngineError, GenerationRow, SamplingParams, make_engine
from handler.engine.static_decode import StaticDecoder
from handler.engine.settings import EngineSettings

ADAPTERS = ["r4", "r8qv", "r16rs", "r16mlp", "patterned"]


def _engine(tiny_model_dir, tokenizer, engine_adapters, decode, eos=None, attn=None):
    model = load_base(tiny_model_dir)
    if attn is not None:
        model.config._attn_implementation = attn
    eng = make_engine("multilora", model, eos_token_ids=eos if eos is not None else [tokenizer.eos_token_id],
                      pad_token_id=tokenizer.pad_token_id,
                      settings=EngineSettings(num_slots=7, max_rank=64, decode=decode))
    for name in ADAPTERS:
        eng.load_adapter(str(engine_adapters[name]), name)
    return eng


def _prompts(n, seed=0, lo=2, hi=20):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tokenizer, engine_adapters):
    return _engine(tiny_model_dir, tokenizer, engine_adapters, "generate")


@pytest.fixture(scope="module")
def static(tiny_model_dir, tokenizer, engine_adapters):
    return _engine(tiny_model_dir, tokenizer, engine_adapters, "static")


def test_auto_on_cpu_is_generate_and_static_is_selected(reference, static):
    assert reference.decode == "generate" and reference.decoder is None
    assert static.decode == "static"
    assert static.get_model_status()["decode"] == "static"


@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_greedy_mixed_batch_equals_generate(reference, static, n):
    # n=3 and n=5 are padded to a bucket of 4 and 8 with filler rows
    prompts = _prompts(n, seed=n)
    names = [[None, *ADAPTERS][i % 6] for i in range(n)]
    rows = [GenerationRow(p, a, SamplingParams(max_new_tokens=3 + 2 * (i % 4))) for i, (p, a) in
            enumerate(zip(prompts, names))]
    got = static.generate(rows)
    want = reference.generate(rows)
    assert got == want
    assert all(len(o.token_ids) == r.params.max_new_tokens for o, r in zip(got, rows) if o.finish_reason == "length")


def test_adapters_change_static_output(static):
    p = _prompts(1, seed=9, lo=8)[0]
    outs = {a: tuple(static.generate([GenerationRow(p, a, SamplingParams(max_new_tokens=8))])[0].token_ids)
            for a in [None, *ADAPTERS]}
    assert len(set(outs.values())) >= 4


def test_eos_stops_each_row_like_generate(tiny_model_dir, tokenizer, engine_adapters, reference):
    prompts = _prompts(6, seed=3)
    probe = reference.generate([GenerationRow(p, "r4", SamplingParams(max_new_tokens=12)) for p in prompts])
    eos = probe[0].token_ids[3]  # a token row 0 emits at step 3: an EOS in mid-generation
    ref = _engine(tiny_model_dir, tokenizer, engine_adapters, "generate", eos=[eos])
    st = _engine(tiny_model_dir, tokenizer, engine_adapters, "static", eos=[eos])
    rows = [GenerationRow(p, a, SamplingParams(max_new_tokens=12)) for p, a in zip(prompts, ["r4", None] * 3)]
    got, want = st.generate(rows), ref.generate(rows)
    assert got == want
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 3


def test_seeded_sampling_equals_generate(reference, static):
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, seed=1234)
    p = _prompts(1, seed=5)[0]
    for adapter in ("r16rs", None):
        got = static.generate([GenerationRow(p, adapter, params)])
        assert got == reference.generate([GenerationRow(p, adapter, params)])
        assert got == static.generate([GenerationRow(p, adapter, params)])


def test_eager_attention_float_mask_path(tiny_model_dir, tokenizer, engine_adapters, reference):
    st = _engine(tiny_model_dir, tokenizer, engine_adapters, "static", attn="eager")
    assert st.decoder.float_mask
    rows = [GenerationRow(p, a, SamplingParams(max_new_tokens=6))
            for p, a in zip(_prompts(4, seed=11), ["r8qv", None, "patterned", "r4"])]
    assert st.generate(rows) == reference.generate(rows)


def test_buckets_are_reused_and_bounded(tiny_model_dir, tokenizer):
    model = load_base(tiny_model_dir)
    dec = StaticDecoder(model, use_graphs=False, decode_graph_buckets=2, len_bucket=32)
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=[], pad_token_id=tokenizer.pad_token_id)

    def run(n, length):
        ids = torch.randint(3, 300, (n, length))
        out = dec.generate(ids, torch.ones_like(ids), None, **kw)
        with torch.inference_mode():
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=1,
                                 min_new_tokens=0, **kw)
        assert torch.equal(out, ref)

    with torch.inference_mode():
        run(3, 10)  # bucket (4, 32)
        run(4, 20)  # same bucket
        assert [(b["batch"], b["cache_len"]) for b in dec.describe()["buckets"]] == [(4, 32)]
        run(2, 40)  # (2, 64)
        run(1, 5)  # (1, 32): the least recently used (4, 32) goes
    assert [(b["batch"], b["cache_len"]) for b in dec.describe()["buckets"]] == [(2, 64), (1, 32)]


def test_decode_rank_on_cpu_and_bad_modes(static, tiny_model_dir, tokenizer):
    m = static.model
    assert m.decode_rank([0, 0]) == 0  # base-only batch: capturable as the plain model
    assert m.decode_rank([m.slot_of("r4"), 0]) is None  # no CUDA kernels here
    with pytest.raises(ValueError, match="unknown decode mode"):
        EngineSettings(num_slots=2, max_rank=8, decode="fast")
    with pytest.raises(EngineError, match="needs the model on a CUDA device"):
        make_engine("multilora", load_base(tiny_model_dir), EngineSettings(num_slots=2, max_rank=8, decode="graphs"),
                    eos_token_ids=[0], pad_token_id=0)
    with pytest.raises(ValueError, match="needs engine 'multilora'"):
        make_engine("peft", load_base(tiny_model_dir), EngineSettings(num_slots=2, max_rank=8, decode="static"),
                    eos_token_ids=[0], pad_token_id=0)


def test_engine_falls_back_to_generate_when_decoder_cannot_capture(tiny_model_dir, tokenizer, engine_adapters,
                                                                   reference, monkeypatch):
    from handler.engine.static_decode import NotCapturable

    st = _engine(tiny_model_dir, tokenizer, engine_adapters, "static")

    def refuse(*a, **k):
        raise NotCapturable("CUDA graph capture failed: test")

    monkeypatch.setattr(st.decoder, "decode", refuse)
    rows = [GenerationRow(p, a, SamplingParams(max_new_tokens=5)) for p, a in zip(_prompts(3, seed=8), ["r4", None, "r8qv"])]
    assert st.generate(rows) == reference.generate(rows)
    status = st.get_model_status()["decoder"]
    assert status["fallbacks"] == 1 and "capture failed" in status["last_fallback"]
