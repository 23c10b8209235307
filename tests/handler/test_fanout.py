"""Fallback chains and compare mode through the service (issue 14 items 4-5; real Redis, tiny model,
no TorchServe), under both schedulers: a fan-out request's rows run as rows of ONE batch (static: one
`engine.generate` call; continuous: every row added to the stepper before the same step), compare's
rows equal the same links asked one by one (token ids and log-probabilities), a chain answers with
the first link whose mean token log-prob clears the threshold (scores checked against PEFT), and bad
fan-out requests get their own 4xx while the rest of the batch is served."""
from __future__ import annotations

import json
import math
import threading
import time

import pytest

from handler.scheduler import Finished, TextDelta
from handler.service import RawRequest
from loraplex_testing.oracle import PeftOracle
from tenant_registry.onboarding import onboard
from tenant_registry.schema import ChainLink
from tenant_registry.validate import BaseModelSpec

TOL = 1e-4
PROMPT = "hello world"
NEW = 6
SCHEDULERS = ["static", "continuous"]
# acme: default v1 = adapter a; summarize v2 = b, v3 = c (current). Link -> oracle adapter name.
LINKS = {"default": "a", "summarize@v2": "b", "summarize": "c", "base": None}
CHAIN_LINK = {"default": ChainLink("default"), "summarize@v2": ChainLink("summarize", 2),
              "summarize": ChainLink("summarize"), "base": ChainLink(base=True)}


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, tiny_adapters):
    return PeftOracle(tiny_model_dir, {k: tiny_adapters[k] for k in ("a", "b", "c")})


@pytest.fixture
def acme(make_service, tiny_adapters, tiny_model_dir):
    """make(**config) -> a service with tenant acme's two tasks onboarded (three adapters)."""
    def make(**overrides):
        svc = make_service(**{"num_slots": 5, **overrides})
        spec = BaseModelSpec.from_model_dir(tiny_model_dir)
        for adapter, task in (("a", "default"), ("b", "summarize"), ("c", "summarize")):
            onboard(svc.registry, svc.store, spec, "acme", tiny_adapters[adapter], svc.config, task=task)
        return svc
    return make


def _req(tenant="acme", headers=None, **fields):
    sent = {"X-Tenant-ID": tenant} if tenant else {}
    return RawRequest({"prompt": PROMPT, "max_new_tokens": NEW, **fields}, {**sent, **(headers or {})})


def _one(svc, **fields):
    return svc.handle_batch([_req(**fields)])[0]


def _set_chain(svc, links, threshold):
    """Set acme's chain and wait until the worker's resolver saw the change event."""
    _changed(svc, lambda: svc.registry.update_policy(
        "acme", lambda p: p.replace(chain=tuple(CHAIN_LINK[x] for x in links), chain_threshold=threshold)))


def _changed(svc, change):
    """Make a registry change and wait until the worker's resolver saw its event. Events of earlier
    changes (an onboarding just before) may still be arriving: they settle first, so that the
    count this waits past is this change's own event."""
    seen, quiet_until = svc.resolver.events_seen, time.monotonic() + 0.3
    while time.monotonic() < quiet_until:
        time.sleep(0.02)
        if svc.resolver.events_seen != seen:
            seen, quiet_until = svc.resolver.events_seen, time.monotonic() + 0.3
    change()
    deadline = time.monotonic() + 10
    while svc.resolver.events_seen == seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert svc.resolver.events_seen > seen, "the policy event did not arrive"


class Calls:
    """Counts what the engine is asked to run: `engine.generate` calls (static) and, continuous,
    `stepper.add`s with the stepper's step count at each (rows added at one count run together)."""

    def __init__(self, svc, monkeypatch, step_delay_s: float = 0.0):
        self.generates: list[int] = []
        self.adds: list[tuple[int, int, str | None]] = []  # (steps so far, rows in the stepper before, adapter)
        self.steps = 0
        engine = svc.engine
        generate = engine.generate

        def counting_generate(rows):
            self.generates.append(len(rows))
            return generate(rows)

        monkeypatch.setattr(engine, "generate", counting_generate)
        if svc.scheduler is not None:
            stepper = svc.scheduler.stepper
            add, decode = stepper.add, stepper.decode_phase

            def counting_add(row_id, row):
                self.adds.append((self.steps, stepper.rows(), row.adapter))
                return add(row_id, row)

            def slow_step():  # a step's second half: once per step
                self.steps += 1
                if step_delay_s:
                    time.sleep(step_delay_s)
                return decode()

            monkeypatch.setattr(stepper, "add", counting_add)
            monkeypatch.setattr(stepper, "decode_phase", slow_step)

    def assert_one_batch(self, svc, rows: int) -> None:
        if svc.scheduler is None:
            assert self.generates == [rows]  # ONE engine call held every row
        else:
            assert self.generates == []
            assert len(self.adds) == rows and len({a[0] for a in self.adds}) == 1, self.adds  # joined one step


def _oracle_row(oracle, adapter):
    """PEFT alone: (token ids, their log-probs) for PROMPT with `adapter` (None = base)."""
    ids = oracle.prompt_ids(PROMPT)
    tokens = oracle.greedy(adapter, ids, NEW)
    lp = oracle.token_logprobs(adapter, ids, tokens)
    return tokens, [lp[t, tok].item() for t, tok in enumerate(tokens)]


# -- compare ---------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_compare_equals_the_separate_runs_row_for_row(acme, oracle, monkeypatch, scheduler):
    svc = acme(scheduler=scheduler)
    entries = ["base", "v1", "summarize@v2", "summarize"]
    alone = {"base": "base", "v1": "acme@v1", "summarize@v2": "acme:summarize@v2", "summarize": "acme:summarize@v3"}
    separate = {e: _one(svc, adapter=alone[e], logprobs=2) for e in entries}
    calls = Calls(svc, monkeypatch)
    reply = _one(svc, compare=entries, logprobs=2)
    assert reply.status == 200, reply.body
    calls.assert_one_batch(svc, rows=4)
    rows = reply.body["compare"]
    assert [r["link"] for r in rows] == entries
    assert [r["version"] for r in rows] == [None, 1, 2, 3]
    assert [r["adapter"] for r in rows] == ["base", "acme@v1", "acme:summarize@v2", "acme:summarize@v3"]
    assert [r["version_by"] for r in rows] == [None, "pinned", "pinned", "current"]  # named, or the current one
    assert [r["route"] for r in rows] == [None] * 4  # compare chose each row's task, not the router
    for entry, row in zip(entries, rows):
        want = separate[entry].body
        assert separate[entry].status == 200, want
        for field in ("text", "task", "adapter", "fallback", "finish_reason", "usage"):
            assert row[field] == want[field], (entry, field)
        assert row["logprobs"]["tokens"] == want["logprobs"]["tokens"], entry
        gaps = [abs(a - b) for a, b in zip(row["logprobs"]["token_logprobs"], want["logprobs"]["token_logprobs"])]
        assert max(gaps) < TOL, (entry, gaps)
        tokens, logprobs = _oracle_row(oracle, {"base": None, "v1": "a", "summarize@v2": "b", "summarize": "c"}[entry])
        assert row["tokens"] == tokens, entry  # and both are PEFT's own answer
        assert max(abs(a - b) for a, b in zip(row["logprobs"]["token_logprobs"], logprobs)) < TOL
    assert len({tuple(r["tokens"]) for r in rows}) == 4  # four different answers: a mixed-up row would show


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_compare_all_versions_is_the_task_history_plus_base(acme, scheduler):
    svc = acme(scheduler=scheduler)
    reply = _one(svc, compare="all_versions", headers={"X-Task": "summarize"})
    assert reply.status == 200, reply.body
    assert [(r["link"], r["adapter"]) for r in reply.body["compare"]] == [
        ("v2", "acme:summarize@v2"), ("v3", "acme:summarize@v3"), ("base", "base")]
    assert [r["text"] for r in reply.body["compare"]] == [
        _one(svc, adapter=a).body["text"] for a in ("acme:summarize@v2", "acme:summarize@v3", "base")]


# -- chain -----------------------------------------------------------------------------

def _scores(oracle):
    out = {}
    for link, adapter in LINKS.items():
        _, logprobs = _oracle_row(oracle, adapter)
        out[link] = math.fsum(logprobs) / len(logprobs)
    return out


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_an_unconfident_first_link_falls_through_to_the_next_in_one_generation(acme, oracle, monkeypatch,
                                                                                scheduler):
    svc = acme(scheduler=scheduler)
    scores = _scores(oracle)
    lo, hi = sorted(["default", "summarize@v2", "summarize"], key=scores.get)[::2]
    assert scores[hi] - scores[lo] > 1e-3, scores  # the threshold below can sit between them
    chain = [lo, hi, "base"]
    _set_chain(svc, chain, (scores[lo] + scores[hi]) / 2)  # lo is not confident enough, hi is
    calls = Calls(svc, monkeypatch)
    reply = _one(svc)
    assert reply.status == 200, reply.body
    calls.assert_one_batch(svc, rows=3)  # the whole chain: one generation
    body = reply.body
    assert body["chain"]["answered_by"] == hi
    assert [link["link"] for link in body["chain"]["links"]] == chain
    for link in body["chain"]["links"]:
        assert abs(link["score"] - scores[link["link"]]) < TOL, link  # PEFT's mean token log-prob
    hi_alone = _one(svc, adapter={"default": "acme@v1", "summarize@v2": "acme:summarize@v2",
                                  "summarize": "acme:summarize@v3"}[hi]).body
    for field in ("text", "task", "adapter", "fallback", "finish_reason", "usage"):
        assert body[field] == hi_alone[field], field  # the answering link's own reply
    assert "logprobs" not in body  # scored with log-probs, shown only when asked
    assert body["route"] is None  # the chain chose the link, not the router

    _set_chain(svc, chain, scores[hi] + 1.0)  # nobody is confident: the last link, base, answers
    body = _one(svc).body
    assert body["chain"]["answered_by"] == "base" and body["adapter"] == "base"
    assert body["text"] == _one(svc, adapter="base").body["text"]
    _set_chain(svc, chain, scores[lo] - 1.0)  # everybody is: the first link answers
    assert _one(svc).body["chain"]["answered_by"] == lo


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_task_a_pin_or_base_bypasses_the_chain(acme, scheduler):
    svc = acme(scheduler=scheduler)
    _set_chain(svc, ["summarize", "base"], 100.0)  # the chain would answer with base
    for fields, adapter in (({"headers": {"X-Task": "summarize"}}, "acme:summarize@v3"),
                            ({"adapter": "acme@v1"}, "acme@v1"), ({"adapter": "base"}, "base")):
        body = _one(svc, **fields).body
        assert "chain" not in body and body["adapter"] == adapter, fields
    body = _one(svc, compare=["v1"]).body  # compare is not chained either
    assert "chain" not in body and body["compare"][0]["adapter"] == "acme@v1"
    chained = _one(svc).body
    assert chained["chain"]["answered_by"] == "base"


def test_the_chain_reaches_openai_replies(acme):
    svc = acme(scheduler="static")
    _set_chain(svc, ["summarize", "base"], -1e9)
    reply = svc.handle_batch([RawRequest({"model": "acme", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0},
                                         {"url_path": "v1/completions"})])[0]
    assert reply.status == 200, reply.body
    assert reply.body["loraplex"]["chain"]["answered_by"] == "summarize"
    assert reply.body["loraplex"]["adapter"] == "acme:summarize@v3"


def test_a_streamed_chain_sends_the_chosen_answer_once_every_link_is_done(acme):
    svc = acme(scheduler="continuous")
    _set_chain(svc, ["default", "base"], -1e9)
    ticket = svc.submit(_req(stream=True))
    events = []
    while not events or not isinstance(events[-1], Finished):
        events.append(ticket.get(timeout=60))
    assert not any(isinstance(e, TextDelta) for e in events)  # no link's text before the choice
    body = events[-1].reply.body
    assert events[-1].reply.status == 200 and body["chain"]["answered_by"] == "default"
    assert body["text"] == _one(svc, adapter="acme@v1").body["text"]
    from handler.stream_format import NdjsonStream  # the wire's last chunk says which link answered

    last = json.loads(NdjsonStream().finish(200, body).splitlines()[-1])
    assert last["chain"] == body["chain"] and last["adapter"] == "acme@v1"


# -- bad input, limits -----------------------------------------------------------------

@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_bad_fanout_requests_fail_alone(acme, make_service, scheduler):
    svc = acme(scheduler=scheduler)
    bad = [
        (dict(compare=["base", "nosuch"]), 404, "nosuch"),
        (dict(compare=["v9"]), 400, "acme@v9"),
        (dict(compare=["bob:summarize@v2"]), 403, "own"),
        (dict(compare=["base"] + [f"v{i}" for i in range(1, 9)]), 400, "max_fanout_rows"),
        (dict(compare=["base", "v1"], stream=True), 400, "stream"),
        (dict(compare=["v1"], adapter="acme@v1"), 400, "'adapter' or 'compare'"),
        (dict(compare=["v1", "v1"]), 400, "twice"),
        (dict(compare=[]), 400, "compare"),
        (dict(compare="everything"), 400, "all_versions"),
        (dict(tenant=None, compare=["base"]), 400, "needs a tenant"),
        (dict(tenant="nobody", compare=["base"]), 404, "nobody"),
        (dict(compare=["bad@v"]), 400, "compare"),
    ]
    good = _req()
    batch = [good] + [_req(**fields) for fields, _, _ in bad] + [_req(compare=["base", "v1"]), good]
    replies = svc.handle_batch(batch)
    want = _one(svc).body["text"]
    assert replies[0].status == 200 and replies[0].body["text"] == want
    assert replies[-1].status == 200 and replies[-1].body["text"] == want
    assert replies[-2].status == 200 and [r["adapter"] for r in replies[-2].body["compare"]] == ["base", "acme@v1"]
    for (fields, status, words), reply in zip(bad, replies[1:]):
        assert reply.status == status, (fields, reply.body)
        assert words in reply.body["error"], (fields, reply.body)
    _changed(svc, lambda: svc.registry.set_status("acme", "disabled"))
    assert _one(svc, compare=["base"]).status == 403  # the tenant's policy holds for compare too


def test_a_fanout_needing_more_adapters_than_fit_is_refused(acme):
    svc = acme(num_slots=4, scheduler="static")  # two resident adapters
    reply = _one(svc, compare=["v1", "summarize@v2", "summarize"])
    assert reply.status == 400 and "num_slots" in reply.body["error"], reply.body
    assert _one(svc, compare=["v1", "summarize"]).status == 200


def test_a_compare_wider_than_the_kv_rows_is_refused(acme):
    svc = acme(scheduler="continuous", kv_rows=2)
    reply = _one(svc, compare=["base", "v1", "summarize"])
    assert reply.status == 400 and "kv_rows" in reply.body["error"], reply.body


# -- continuous: all or none, cancel, timeout -----------------------------------------

def test_continuous_admits_a_fanout_all_or_none(acme, monkeypatch):
    svc = acme(scheduler="continuous", kv_rows=3)
    calls = Calls(svc, monkeypatch, step_delay_s=0.01)
    long = svc.submit(RawRequest({"prompt": "the quick brown fox", "max_new_tokens": 32}, {}))
    first = long.get(timeout=60)  # the long base row is running: one KV row of three taken
    fan = svc.submit(_req(compare=["base", "v1", "summarize"]))
    reply = _finished(fan)
    assert reply.status == 200, reply.body
    group = calls.adds[1:]
    assert len(group) == 3 and len({a[0] for a in group}) == 1 and group[0][1] == 0, calls.adds
    # its three rows joined together once all three KV rows were free, not one by one
    if not isinstance(first, Finished):
        assert _finished(long).status == 200


def _settled(svc):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if svc.scheduler.stepper.rows() == 0 and not svc.residency.held_ids():
            return True
        time.sleep(0.01)
    return False


def _finished(ticket):
    while True:
        event = ticket.get(timeout=60)
        if isinstance(event, Finished):
            return event.reply


def test_cancel_and_timeout_end_every_row_of_a_fanout(acme, monkeypatch):
    svc = acme(scheduler="continuous")
    calls = Calls(svc, monkeypatch, step_delay_s=0.05)
    running = threading.Event()
    add = svc.scheduler.stepper.add

    def add_and_tell(row_id, row):
        add(row_id, row)
        if len(calls.adds) == 4:  # the other request's row and the fan-out's three
            running.set()

    monkeypatch.setattr(svc.scheduler.stepper, "add", add_and_tell)
    other = svc.submit(RawRequest({"prompt": "the quick brown fox", "max_new_tokens": 12}, {}))
    fan = svc.submit(_req(compare=["base", "v1", "summarize"], max_new_tokens=32))
    assert running.wait(30)
    fan.cancel()
    assert _finished(fan).status == 499
    assert _finished(other).status == 200  # the other request is served on
    assert _settled(svc), (svc.scheduler.stepper.rows(), svc.residency.held_ids())

    svc.scheduler.request_timeout_s = 1e-6
    reply = _finished(svc.submit(_req(compare=["base", "v1", "summarize"])))
    assert reply.status == 504, reply.body
    assert _settled(svc)
    assert svc.scheduler.snapshot()["in_flight"] == 0


def test_a_fanout_waits_rather_than_take_its_tenant_past_tenant_max_running(acme, monkeypatch):
    svc = acme(scheduler="continuous", tenant_max_running=2)
    calls = Calls(svc, monkeypatch, step_delay_s=0.01)
    long = svc.submit(_req(max_new_tokens=32, prompt="the quick brown fox"))
    first = long.get(timeout=60)  # one of acme's rows runs
    reply = _finished(svc.submit(_req(compare=["base", "v1"])))
    assert reply.status == 200, reply.body
    group = calls.adds[1:]
    assert len(group) == 2 and group[0][1] == 0, calls.adds  # 1 + 2 > 2: it waited for the long row
    if not isinstance(first, Finished):
        assert _finished(long).status == 200
    wide = _finished(svc.submit(_req(compare=["base", "v1", "summarize"])))  # wider than the cap: runs alone
    assert wide.status == 200, wide.body


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_chain_serves_a_tenant_without_a_default_task(make_service, tiny_adapters, tiny_model_dir, scheduler):
    """The chain decides the request before the task would be: a tenant with named tasks only is not
    refused for lacking a `default` task."""
    svc = make_service(scheduler=scheduler)
    spec = BaseModelSpec.from_model_dir(tiny_model_dir)
    onboard(svc.registry, svc.store, spec, "solo", tiny_adapters["b"], svc.config, task="summarize")
    plain = svc.handle_batch([_req(tenant="solo")])[0]
    assert plain.status == 404 and "default" in plain.body["error"]  # no chain: no default task, 404
    _changed(svc, lambda: svc.registry.update_policy(
        "solo", lambda p: p.replace(chain=(ChainLink("summarize"), ChainLink(base=True)), chain_threshold=-1e9)))
    body = svc.handle_batch([_req(tenant="solo")])[0].body
    assert body["chain"]["answered_by"] == "summarize" and body["adapter"] == "solo:summarize@v1", body
