"""`Engine.generate` through both engines: batch-independent greedy output,
seeded sampling, EOS handling, explicit decoding settings."""
from __future__ import annotations

import pytest
import torch

from conftest import load_base
from handler.engine import GenerationOutput, GenerationRow, SamplingParams, make_engine
from handler.engine.generation import finish, group_rows, left_pad
from handler.engine.settings import EngineSettings

KINDS = ["multilora", "peft"]
ADAPTERS = ["r4", "r8qv", "r16rs", "r16mlp"]


def _make(kind, tiny_model_dir, tokenizer, engine_adapters, eos=None, model=None):
    eng = make_engine(kind, model or load_base(tiny_model_dir),
                      eos_token_ids=eos if eos is not None else [tokenizer.eos_token_id],
                      pad_token_id=tokenizer.pad_token_id, settings=EngineSettings(num_slots=5, max_rank=64))
    for name in ADAPTERS:
        eng.load_adapter(str(engine_adapters[name]), name)
    return eng


@pytest.fixture(scope="module", params=KINDS)
def engine(request, tiny_model_dir, tokenizer, engine_adapters):
    return _make(request.param, tiny_model_dir, tokenizer, engine_adapters)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


GREEDY = SamplingParams(max_new_tokens=8)


def test_greedy_row_does_not_depend_on_batch_mates(engine):
    prompts = _prompts(6)
    adapters = ["r4", None, "r8qv", "r16rs", "r4", "r16mlp"]
    batch = engine.generate([GenerationRow(p, a, GREEDY) for p, a in zip(prompts, adapters)])
    for i, (p, a) in enumerate(zip(prompts, adapters)):
        alone = engine.generate([GenerationRow(p, a, GREEDY)])[0]
        assert batch[i] == alone, (i, a)
    reordered = engine.generate([GenerationRow(prompts[i], adapters[i], GREEDY) for i in (5, 3, 1, 0)])
    assert [reordered[j] for j in range(4)] == [batch[i] for i in (5, 3, 1, 0)]
    assert len({tuple(o.token_ids) for o in batch}) > 1  # rows really differ


def test_both_engines_agree_and_adapters_matter(tiny_model_dir, tokenizer, engine_adapters):
    prompts = _prompts(5, seed=1)
    adapters = ["r16rs", "r4", None, "r8qv", "r16mlp"]
    rows = [GenerationRow(p, a, GREEDY) for p, a in zip(prompts, adapters)]
    ours = _make("multilora", tiny_model_dir, tokenizer, engine_adapters).generate(rows)
    peft = _make("peft", tiny_model_dir, tokenizer, engine_adapters).generate(rows)
    assert ours == peft
    base = _make("multilora", tiny_model_dir, tokenizer, engine_adapters).generate(
        [GenerationRow(p, None, GREEDY) for p in prompts])
    assert ours[2] == base[2]
    assert sum(ours[i] != base[i] for i in (0, 1, 3, 4)) >= 3


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    p = _prompts(3, seed=2)
    seeded = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, seed=1234)
    other = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.7)
    alone = engine.generate([GenerationRow(p[0], "r4", seeded)])[0]
    mixed = engine.generate([GenerationRow(p[1], "r8qv", other), GenerationRow(p[0], "r4", seeded),
                             GenerationRow(p[2], None, GREEDY)])
    assert mixed[1] == alone
    different = engine.generate([GenerationRow(p[0], "r4", SamplingParams(max_new_tokens=10, do_sample=True,
                                                                           temperature=1.5, seed=99))])[0]
    assert different != alone


def test_seeded_row_leaves_global_rng_alone(engine):
    state = torch.get_rng_state()
    engine.generate([GenerationRow([5, 6, 7], None, SamplingParams(max_new_tokens=4, do_sample=True, seed=3))])
    assert torch.equal(torch.get_rng_state(), state)


def test_rows_with_different_lengths_are_cut_at_their_own_limit(engine):
    p = [q for q in _prompts(12, seed=3)
         if engine.generate([GenerationRow(q, "r4", GREEDY)])[0].finish_reason == "length"][:2]
    assert len(p) == 2
    short = SamplingParams(max_new_tokens=3)
    out = engine.generate([GenerationRow(p[0], "r4", short), GenerationRow(p[1], "r4", GREEDY)])
    full = engine.generate([GenerationRow(p[0], "r4", GREEDY)])[0]
    assert out[0].token_ids == full.token_ids[:3] and out[0].finish_reason == "length"
    assert len(out[1].token_ids) == 8


@pytest.mark.parametrize("kind", KINDS)
def test_stops_at_first_eos(kind, tiny_model_dir, tokenizer, engine_adapters, engine):
    prompt = _prompts(1, seed=4)[0]
    free = engine.generate([GenerationRow(prompt, "r16rs", GREEDY)])[0]
    eos = free.token_ids[3]
    cut = free.token_ids.index(eos)
    eng = _make(kind, tiny_model_dir, tokenizer, engine_adapters, eos=[eos])
    out = eng.generate([GenerationRow(prompt, "r16rs", GREEDY), GenerationRow(_prompts(1, seed=5)[0], None, GREEDY)])
    assert out[0] == GenerationOutput(token_ids=free.token_ids[:cut], finish_reason="stop")
    assert eos not in out[1].token_ids


@pytest.mark.parametrize("kind", KINDS)
def test_model_generation_config_defaults_do_not_leak(kind, tiny_model_dir, tokenizer, engine_adapters, engine):
    rows = [GenerationRow(p, a, GREEDY) for p, a in zip(_prompts(3, seed=6), ["r4", None, "r8qv"])]
    want = engine.generate(rows)
    model = load_base(tiny_model_dir)
    gc = model.generation_config
    gc.do_sample, gc.top_k, gc.temperature, gc.repetition_penalty, gc.no_repeat_ngram_size = True, 3, 5.0, 3.0, 2
    gc.max_new_tokens, gc.min_new_tokens = 2, 1
    assert _make(kind, tiny_model_dir, tokenizer, engine_adapters, model=model).generate(rows) == want


def test_group_rows_rules():
    g, s1, s2 = SamplingParams(), SamplingParams(do_sample=True, temperature=0.5), SamplingParams(do_sample=True, seed=1)
    rows = [GenerationRow([1], None, g), GenerationRow([1], "a", s1), GenerationRow([1], "b", s2),
            GenerationRow([1], "c", SamplingParams(max_new_tokens=3, seed=7)), GenerationRow([1], "d", s1),
            GenerationRow([1], "e", s2)]
    assert group_rows(rows) == [[0, 3], [1, 4], [2], [5]]


def test_left_pad_and_finish():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert finish([4, 9, 2, 9], 10, [9]) == GenerationOutput([4], "stop")
    assert finish([4, 5, 6, 9], 3, [9]) == GenerationOutput([4, 5, 6], "length")
    assert finish([9], 1, [7, 9]) == GenerationOutput([], "stop")


def test_empty_prompt_is_refused(engine):
    with pytest.raises(ValueError, match="row 0: empty prompt"):
        engine.generate([GenerationRow([], None)])
