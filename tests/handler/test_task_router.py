"""The task router's plumbing (issue 14 item 2) on the tiny random model and a real Redis: the engines'
`embed` is the bare base model's mean-pooled last hidden state whatever adapters are loaded; the
built-in router picks by centred cosine, caches example embeddings per (tenant, task, examples) and
makes one engine call per request; `router: classify` picks the task (served with PEFT's output for
that task's adapter) under both schedulers, on the thread that owns the engine; an explicit task
always wins; a plug-in router named in the config is used, and its errors or unknown tasks are the
default task, counted, never a 5xx. (Accuracy on the demo model: tests/demo/test_router_accuracy.py.)"""
from __future__ import annotations

import sys
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from handler.engine import EngineSettings, make_engine
from handler.engine.api import GenerationRow, SamplingParams
from handler.engine.embedding import mean_pooled
from handler.service import RawRequest
from handler.task_router import EmbeddingRouter, RouteDecision, TaskRouting, load_plugin, routing_text
from loraplex_common.config import ConfigError, LoraplexConfig
from loraplex_testing.oracle import PeftOracle
from tenant_registry.onboarding import onboard
from tenant_registry.validate import BaseModelSpec

NEW = 6
# One example per task, and each request's prompt IS one task's example: with a random model the
# only prompt whose nearest centroid is certain is the example itself (centred cosine exactly 1).
EXAMPLES = {"default": ("numbers 0 1 2 3 4 5",), "summarize": ("the quick brown fox jumps over the lazy dog.",),
            "translate": ("What is the capital of France?",)}
ADAPTER_OF = {"default": "a", "summarize": "b", "translate": "c"}


def _model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


def _ids(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


# -- the engines' embed ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["multilora", "peft"])
def test_engine_embed_is_the_bare_base_models_mean_pooled_state(tiny_model_dir, tiny_adapters, kind):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    batch = _ids(tok, ["hello world", "the quick brown fox jumps over the lazy dog.", "Paris"])
    bare = _model(tiny_model_dir)
    with torch.no_grad():  # the reference: each prompt alone through the plain model, its states averaged
        want = torch.stack([bare(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0)
                            for ids in batch])
    engine = make_engine(kind, _model(tiny_model_dir), EngineSettings(num_slots=4, max_rank=16),
                         eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    before = engine.embed(batch)
    for name in ("a", "c"):
        engine.load_adapter(tiny_adapters[name], name)
    engine.set_adapter("c")  # an active default adapter must not leak into the base model's embedding
    after = engine.embed(batch)
    assert before.dtype == torch.float32 and before.shape == (3, bare.config.hidden_size)
    assert torch.allclose(before, want, atol=1e-5) and torch.allclose(after, want, atol=1e-5)
    # and the adapter is really there: a row on it is not the base model's
    row = [GenerationRow(batch[1], "c", SamplingParams(max_new_tokens=4, logprobs=1)),
           GenerationRow(batch[1], None, SamplingParams(max_new_tokens=4, logprobs=1))]
    adapted, plain = engine.generate(row)
    assert abs(adapted.token_logprobs[0] - plain.token_logprobs[0]) > 1e-3 or adapted.token_ids != plain.token_ids


def test_mean_pooled_ignores_padding(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = _model(tiny_model_dir)
    batch = _ids(tok, ["hi", "the quick brown fox jumps over the lazy dog. " * 3])
    together = mean_pooled(model, batch, pad_token_id=tok.pad_token_id)
    alone = torch.cat([mean_pooled(model, [ids], pad_token_id=tok.pad_token_id) for ids in batch])
    assert torch.allclose(together, alone, atol=1e-5)
    with pytest.raises(ValueError):
        mean_pooled(model, [[]], pad_token_id=tok.pad_token_id)


# -- the built-in router on given vectors -------------------------------------------------------------

class _Vectors:
    """embed: each text's vector from a table (token ids are the text's characters' code points)."""

    def __init__(self, table):
        self.table = table
        self.calls: list[list[str]] = []

    def tokenize(self, text):
        return [ord(c) for c in text]

    def __call__(self, batch):
        texts = ["".join(map(chr, ids)) for ids in batch]
        self.calls.append(texts)
        return torch.stack([torch.tensor(self.table[t], dtype=torch.float32) for t in texts])


def test_centroid_versus_nearest_and_the_centred_score():
    # a shared component of 10 in every vector (what a causal LM's states have): uncentred, all cosines ~1
    table = {"q": [10, 0.9, 0.1, 0], "a1": [10, 1, 0, 0], "a2": [10, -0.2, 0, 1.0], "b1": [10, 0.8, 0.3, 0],
             "b2": [10, 0.8, 0.3, 0.1]}
    vec = _Vectors(table)
    examples = {"a": ("a1", "a2"), "b": ("b1", "b2")}
    by_centroid = EmbeddingRouter(vec, vec.tokenize).route("t", "q", examples)
    by_nearest = EmbeddingRouter(vec, vec.tokenize, method="nearest").route("t", "q", examples)
    assert by_centroid.task == "b" and by_nearest.task == "a"  # a1 alone is nearest; b's examples as a whole
    assert by_centroid.by == "classify" and -1.0 <= by_centroid.score <= 1.0
    assert by_centroid.score < 0.99  # centred: not the ~1.0 every raw cosine here is
    with pytest.raises(ValueError):
        EmbeddingRouter(vec, vec.tokenize, method="knn")


def test_example_embeddings_are_cached_per_tenant_task_and_examples():
    table = {t: [float(i == j) for j in range(4)] for i, t in enumerate(["q", "x1", "y1", "y2"])}
    table["q"] = [0, 1, 0.2, 0]
    vec = _Vectors(table)
    router = EmbeddingRouter(vec, vec.tokenize)
    ex = {"x": ("x1",), "y": ("y1",)}
    assert router.route("t1", "q", ex).task == "x"
    assert vec.calls[-1] == ["q", "x1", "y1"]  # the prompt and every new example: one engine call
    assert router.route("t1", "q", ex).task == "x"
    assert vec.calls[-1] == ["q"]  # cached: only the prompt
    router.route("t1", "q", {"x": ("x1",), "y": ("y1", "y2")})  # y's examples changed: y alone again
    assert vec.calls[-1] == ["q", "y1", "y2"]
    router.route("t2", "q", ex)  # another tenant's tasks are its own entries
    assert vec.calls[-1] == ["q", "x1", "y1"] and router.cached() == 5 and router.embed_calls == 4
    small = EmbeddingRouter(vec, vec.tokenize, max_cached=2)
    small.route("t", "q", ex)
    small.route("t", "q", {"z": ("y2",), **ex})
    assert small.cached() == 2


def test_routing_text_is_the_prompt_or_the_last_user_turn():
    assert routing_text("raw", None) == "raw"
    chat = ({"role": "system", "content": "be nice"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "translate this"})
    assert routing_text(None, chat) == "translate this"
    assert routing_text(None, ({"role": "system", "content": "only"},)) == "only"


# -- TaskRouting: policy, plug-ins, failures ----------------------------------------------------------

def test_decide_header_router_missing_examples_errors_and_unknown_tasks():
    tasks = ("default", "summarize")
    calls = []

    answers = {"odd": "nope", "num": ("summarize", 0.5), "obj": RouteDecision("summarize", "ignored", None),
               "bad": 42}

    def plugin(prompt, examples):
        calls.append((prompt, dict(examples)))
        if prompt == "boom":
            raise RuntimeError("down")
        return answers.get(prompt, "summarize")

    routing = TaskRouting(None, plugin, "mypkg.routers:pick")
    ex = {"summarize": ("sum it up",), "gone": ("a removed task's examples",)}
    assert routing.decide("t", "x", "header", ex, tasks) == RouteDecision("default", "default")
    assert routing.decide("t", "x", "classify", {}, tasks) == RouteDecision("default", "default")
    assert not calls  # neither asks the router
    assert routing.decide("t", "x", "classify", ex, tasks) == RouteDecision("summarize", "mypkg.routers:pick")
    assert calls[-1][1] == {"summarize": ("sum it up",)}  # only tasks the tenant has
    assert routing.decide("t", "num", "classify", ex, tasks) == RouteDecision("summarize", "mypkg.routers:pick", 0.5)
    assert routing.decide("t", "obj", "classify", ex, tasks).by == "mypkg.routers:pick"
    for prompt in ("boom", "bad"):  # raises / returns junk: the default task, counted as errors
        assert routing.decide("t", prompt, "classify", ex, tasks) == RouteDecision("default", "default")
    assert routing.decide("t", "odd", "classify", ex, tasks) == RouteDecision("default", "default")
    assert routing.describe() == {"router": "mypkg.routers:pick", "routed": 3, "errors": 2, "unknown_task": 1}
    assert TaskRouting.explicit("summarize") == RouteDecision("summarize", "header", None)


def test_config_key_and_plugin_loading(tmp_path, monkeypatch):
    assert LoraplexConfig().task_router == "builtin"
    assert LoraplexConfig.load(env={"LORAPLEX_TASK_ROUTER": "pkg.mod:Cls.fn"}).task_router == "pkg.mod:Cls.fn"
    for bad in ("nope", "pkg/mod:fn", "pkg.mod:", ":fn", "pkg.mod:fn()"):
        with pytest.raises(ConfigError) as e:
            LoraplexConfig.from_mapping({"task_router": bad})
        assert e.value.key == "task_router"
    (tmp_path / "lpx_router_plugin.py").write_text("def pick(prompt, examples):\n    return 'summarize'\nVALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_plugin("lpx_router_plugin:pick")("x", {}) == "summarize"
    for bad in ("lpx_router_plugin:missing", "lpx_router_plugin:VALUE", "no_such_module_lpx:fn"):
        with pytest.raises(ValueError):
            load_plugin(bad)


# -- through the service ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle(tiny_model_dir, tiny_adapters):
    return PeftOracle(tiny_model_dir, {k: tiny_adapters[k] for k in ("a", "b", "c")})


def _tenant(svc, tiny_model_dir, tiny_adapters, router="classify"):
    spec = BaseModelSpec.from_model_dir(tiny_model_dir)
    for task, name in ADAPTER_OF.items():
        onboard(svc.registry, svc.store, spec, "acme", tiny_adapters[name], svc.config, task=task)
    svc.registry.update_policy("acme", lambda p: p.replace(router=router, examples=EXAMPLES))


def _ask(prompt, **extra):
    headers = {"X-Tenant-ID": "acme", **extra.pop("headers", {})}
    return RawRequest({"prompt": prompt, "max_new_tokens": NEW, "logprobs": 1, **extra}, headers)


def _served_by(svc, oracle, reply, adapter):
    prompt_ids = oracle.prompt_ids(reply_prompt(reply))
    ids = oracle.greedy(adapter, prompt_ids, NEW)
    assert reply.body["logprobs"]["tokens"] == [svc.tokenizer.decode([i]) for i in ids]
    want = oracle.token_logprobs(adapter, prompt_ids, ids)
    assert max(abs(g - want[t, ids[t]].item()) for t, g in enumerate(reply.body["logprobs"]["token_logprobs"])) < 1e-4


_PROMPTS: dict[int, str] = {}


def reply_prompt(reply):
    return _PROMPTS[id(reply)]


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_classify_picks_the_task_on_the_engine_thread_and_explicit_wins(make_service, tiny_model_dir, tiny_adapters,
                                                                         oracle, scheduler):
    svc = make_service(scheduler=scheduler)
    assert svc.scheduler_kind == scheduler
    _tenant(svc, tiny_model_dir, tiny_adapters)
    threads = []
    real = svc.engine.embed
    svc.engine.embed = lambda batch: (threads.append(threading.current_thread().name), real(batch))[1]
    prompts = [EXAMPLES["summarize"][0], EXAMPLES["translate"][0], EXAMPLES["default"][0]]
    replies = svc.handle_batch([_ask(p) for p in prompts])
    for reply, prompt, task in zip(replies, prompts, ("summarize", "translate", "default")):
        assert reply.status == 200, reply.body
        assert reply.body["task"] == task and reply.body["route"]["task"] == task
        assert reply.body["route"]["by"] == "classify" and reply.body["route"]["score"] == pytest.approx(1.0, abs=1e-3)
        _PROMPTS[id(reply)] = prompt
        _served_by(svc, oracle, reply, ADAPTER_OF[task])
    owner = "loraplex-scheduler" if scheduler == "continuous" else threading.current_thread().name
    assert threads and set(threads) == {owner}
    # explicit task wins over the classifier (header, body, OpenAI model): by "header", no score
    explicit = svc.handle_batch([_ask(prompts[0], headers={"X-Task": "translate"}), _ask(prompts[0], task="translate"),
                                 RawRequest({"model": "acme:translate", "prompt": prompts[0], "max_tokens": NEW,
                                             "temperature": 0}, {"url_path": "v1/completions"})])
    for reply in explicit[:2]:
        assert reply.body["task"] == "translate" and reply.body["route"] == {"task": "translate", "by": "header",
                                                                           "score": None}
    assert explicit[2].body["loraplex"]["route"] == {"task": "translate", "by": "header", "score": None}
    chat = svc.handle_batch([RawRequest({"model": "acme", "messages": [{"role": "user", "content": prompts[1]}],
                                         "max_tokens": NEW, "temperature": 0}, {"url_path": "v1/chat/completions"})])[0]
    assert chat.body["loraplex"]["task"] == "translate" and chat.body["loraplex"]["route"]["by"] == "classify"
    assert svc.describe()["router"]["routed"] == 4 and svc.describe()["router"]["cached_tasks"] == 3


def test_header_router_and_no_tenant(make_service, tiny_model_dir, tiny_adapters):
    svc = make_service(scheduler="static")
    _tenant(svc, tiny_model_dir, tiny_adapters, router="header")
    svc.engine.embed = lambda batch: pytest.fail("router: header must not embed")
    reply = svc.handle_batch([_ask(EXAMPLES["summarize"][0])])[0]
    assert reply.body["task"] == "default" and reply.body["route"] == {"task": "default", "by": "default",
                                                                       "score": None}
    anon = svc.handle_batch([RawRequest({"prompt": "hello", "max_new_tokens": 2}, {})])[0]
    assert anon.status == 200 and anon.body["route"] is None
    base = svc.handle_batch([_ask("hello", adapter="base")])[0]
    assert base.status == 200 and base.body["route"] is None
    pinned = svc.handle_batch([_ask("hello", adapter="acme:summarize@v2")])[0]
    assert pinned.body["route"] == {"task": "summarize", "by": "header", "score": None}


def test_a_missing_named_task_served_by_default_says_so(make_service, tiny_model_dir, tiny_adapters):
    svc = make_service(scheduler="static", unknown_task_policy="default")
    _tenant(svc, tiny_model_dir, tiny_adapters)
    reply = svc.handle_batch([_ask("hello", headers={"X-Task": "poetry"})])[0]
    assert reply.status == 200 and reply.body["task"] == "default"
    assert reply.body["route"] == {"task": "default", "by": "default", "score": None}


def test_router_failure_is_the_default_task_never_a_5xx(make_service, tiny_model_dir, tiny_adapters, oracle,
                                                        tmp_path, monkeypatch):
    svc = make_service(scheduler="continuous")
    _tenant(svc, tiny_model_dir, tiny_adapters)

    def broken(batch):
        raise RuntimeError("engine out of memory")

    svc.engine.embed = broken
    reply = svc.handle_batch([_ask(EXAMPLES["summarize"][0])])[0]
    assert reply.status == 200 and reply.body["task"] == "default"
    assert reply.body["route"] == {"task": "default", "by": "default", "score": None}
    _PROMPTS[id(reply)] = EXAMPLES["summarize"][0]
    _served_by(svc, oracle, reply, "a")
    assert svc.describe()["router"]["errors"] == 1

    # a plug-in named in the config: used for classify tenants; an unknown task it returns is the default
    (tmp_path / "lpx_router_e.py").write_text(
        "def pick(prompt, examples):\n    return ('translate', 0.25) if 'fox' in prompt else 'no-such-task'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("lpx_router_e", None)
    plug = make_service(scheduler="static", task_router="lpx_router_e:pick")
    _tenant(plug, tiny_model_dir, tiny_adapters)
    got = plug.handle_batch([_ask(EXAMPLES["summarize"][0]), _ask("something else")])
    assert got[0].body["task"] == "translate" and got[0].body["route"] == {"task": "translate",
                                                                           "by": "lpx_router_e:pick", "score": 0.25}
    assert got[1].status == 200 and got[1].body["task"] == "default" and got[1].body["route"]["by"] == "default"
    assert plug.describe()["router"] == {"router": "lpx_router_e:pick", "routed": 1, "errors": 0, "unknown_task": 1}
    with pytest.raises(ConfigError):
        make_service(scheduler="static", task_router="lpx_router_e:absent")
