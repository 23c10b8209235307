"""bf16 on CUDA: rows match PEFT within 2e-2, loads use pinned staging, and
allocated memory returns to its start after load/evict cycles."""
from __future__ import annotations

import pytest
import torch

from conftest import load_base, load_peft, peft_row_logits, rel_err
from handler.engine.multilora import MultiLoraModel
from handler.engine.settings import EngineSettings

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NAMES = ["r4", "r8qv", "r16rs", "r64", "patterned"]


def test_bf16_mixed_batch_matches_peft(tiny_model_dir, engine_adapters):
    dev = "cuda"
    ml = MultiLoraModel(load_base(tiny_model_dir, torch.bfloat16, dev), EngineSettings(num_slots=7, max_rank=64))
    for n in NAMES:
        ml.load_adapter(engine_adapters[n], n)
    assert ml._staging is not None and ml._staging.is_pinned()
    pm = load_peft(tiny_model_dir, {n: engine_adapters[n] for n in NAMES}, torch.bfloat16, dev)
    torch.manual_seed(0)
    rows = NAMES + [None]
    ids = torch.randint(3, 300, (len(rows), 16), device=dev)
    with torch.no_grad():
        ours = ml(ids, adapter_names=rows).logits
        for i, n in enumerate(rows):
            assert rel_err(ours[i], peft_row_logits(pm, n, ids[i])) <= 2e-2, n


def test_cuda_memory_returns_after_cycles(tiny_model_dir, engine_adapters):
    ml = MultiLoraModel(load_base(tiny_model_dir, torch.bfloat16, "cuda"), EngineSettings(num_slots=3, max_rank=64))
    ml.load_adapter(engine_adapters["r64"], "warm")  # allocates the staging buffer once
    ml.delete_adapter("warm")
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for i in range(200):
        name = NAMES[i % len(NAMES)]
        ml.load_adapter(engine_adapters[name], name)
        ml.delete_adapter(name)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start
    assert not ml.pool.any()


def _decode_rows_vs_peft(model_dir, adapters, rows, dtype, dev, tol, prompt=8, steps=4):
    """Prefill + `steps` single-token decode steps through the KV cache (the path
    `generate` takes, S=1), every row against PEFT's full forward on that row."""
    names = sorted({n for n in rows if n is not None})
    ml = MultiLoraModel(load_base(model_dir, dtype, dev), EngineSettings(num_slots=len(names) + 2, max_rank=64))
    for n in names:
        ml.load_adapter(adapters[n], n)
    pm = load_peft(model_dir, {n: adapters[n] for n in names}, dtype, dev)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (len(rows), prompt + steps), generator=g).to(dev)
    with torch.no_grad():
        out = ml(ids[:, :prompt], adapter_names=rows, use_cache=True)
        got = [out.logits[:, -1]]
        for t in range(prompt, prompt + steps - 1):
            out = ml(ids[:, t:t + 1], adapter_names=rows, past_key_values=out.past_key_values, use_cache=True)
            got.append(out.logits[:, -1])
        got = torch.stack(got, 1)  # [rows, steps, V]: logits after positions prompt-1 .. prompt+steps-2
        for i, n in enumerate(rows):
            ref = peft_row_logits(pm, n, ids[i])[prompt - 1: prompt + steps - 1]
            for t in range(steps):
                assert rel_err(got[i, t], ref[t]) <= tol, (n, t)


@pytest.mark.parametrize("kind", ["mixed", "single"])
def test_bf16_decode_steps_match_peft(tiny_model_dir, engine_adapters, kind):
    """Decode (S=1 through the KV cache): Triton kernel for the mixed batch, the
    uniform path when every row shares one adapter."""
    rows = NAMES + [None] + NAMES[:2] if kind == "mixed" else ["r16rs"] * 4
    _decode_rows_vs_peft(tiny_model_dir, engine_adapters, rows, torch.bfloat16, "cuda", 2e-2)


def _graph_engines(model_dir, adapters, tokenizer, names, dtype=torch.float32):
    from handler.engine import make_engine

    engines = {}
    for decode in ("graphs", "generate"):
        eng = make_engine("multilora", load_base(model_dir, dtype, "cuda"), eos_token_ids=[tokenizer.eos_token_id],
                          pad_token_id=tokenizer.pad_token_id,
                          settings=EngineSettings(num_slots=len(names) + 2, max_rank=64, decode=decode))
        for n in names:
            eng.load_adapter(str(adapters[n]), n)
        engines[decode] = eng
    return engines["graphs"], engines["generate"]


def test_auto_decode_on_cuda_is_graphs(tiny_model_dir, tokenizer):
    from handler.engine import make_engine

    eng = make_engine("multilora", load_base(tiny_model_dir, torch.bfloat16, "cuda"), eos_token_ids=[0],
                      pad_token_id=0, settings=EngineSettings(num_slots=2, max_rank=64))
    assert eng.decode == "graphs"


def test_graph_decode_equals_generate_and_survives_adapter_changes(tiny_model_dir, tokenizer, engine_adapters):
    """fp32 on CUDA: the replayed graph decodes what `generate` decodes, row by row; a graph
    captured for one set of adapters serves another mix and a slot reloaded with a new adapter."""
    from handler.engine import GenerationRow, SamplingParams

    graphs, ref = _graph_engines(tiny_model_dir, engine_adapters, tokenizer, NAMES)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (7,), generator=g)]

    def rows(names):
        return [GenerationRow(p, a, SamplingParams(max_new_tokens=12)) for p, a in zip(prompts, names)]

    first = rows(["r4", None, "r8qv", "r16rs", "r64", "patterned", "r4"])
    assert graphs.generate(first) == ref.generate(first)
    st = graphs.decoder.describe()
    assert graphs.decoder.captures == 1 and st["buckets"][0]["replays"] >= 1, st
    second = rows(["patterned", "r16rs", None, "r4", "r64", "r8qv", "r16rs"])  # same bucket, other slots
    assert graphs.generate(second) == ref.generate(second)
    assert graphs.decoder.captures == 1
    for eng in (graphs, ref):  # slot of r4 now holds other weights under another name
        eng.delete_adapter("r4")
        eng.load_adapter(str(engine_adapters["r16mlp"]), "r16mlp")
    third = rows(["r16mlp", None, "r8qv", "r16mlp", "r64", "patterned", "r16rs"])
    assert graphs.generate(third) == ref.generate(third)
    assert graphs.decoder.captures == 1
    base = rows([None] * 7)  # no adapter rows: rank-0 bucket, the plain model captured
    assert graphs.generate(base) == ref.generate(base)
    assert graphs.decoder.captures == 2 and graphs.fallbacks == 0


def test_graph_decode_seeded_sampling_equals_generate(tiny_model_dir, tokenizer, engine_adapters):
    """Sampling reads the replayed graph's logits through transformers' own warpers: the same
    seed gives `generate`'s tokens (fp32), and the same tokens again on a second call."""
    from handler.engine import GenerationRow, SamplingParams

    graphs, ref = _graph_engines(tiny_model_dir, engine_adapters, tokenizer, ["r16rs", "patterned"])
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.7, top_p=0.9, seed=77)
    for adapter in ("r16rs", "patterned", None):
        row = [GenerationRow([5, 17, 42, 9, 100], adapter, params)]
        got = graphs.generate(row)
        assert got == ref.generate(row) == graphs.generate(row)
    assert graphs.decoder.captures >= 1 and graphs.fallbacks == 0


def test_failed_capture_falls_back_to_generate_then_recovers(tiny_model_dir, tokenizer, engine_adapters,
                                                             monkeypatch):
    from handler.engine import GenerationRow, SamplingParams

    graphs, ref = _graph_engines(tiny_model_dir, engine_adapters, tokenizer, ["r4", "r8qv"])
    rows = [GenerationRow([3, 9, 27, 81], a, SamplingParams(max_new_tokens=6)) for a in ("r4", None, "r8qv")]
    real = graphs.decoder._capture

    def boom(st):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(graphs.decoder, "_capture", boom)
    assert graphs.generate(rows) == ref.generate(rows)
    assert graphs.fallbacks == 1 and graphs.decoder.describe()["buckets"] == []
    monkeypatch.setattr(graphs.decoder, "_capture", real)
    assert graphs.generate(rows) == ref.generate(rows)
    assert graphs.decoder.captures == 1 and graphs.fallbacks == 1
