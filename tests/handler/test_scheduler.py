"""The continuous scheduler (handler/scheduler.py) through LoraplexService.submit, on the real
MultiLoraEngine stepper over the tiny random Llama, a real redis-server and adapter store. The
oracle is the static path: the same request served alone by `handle_batch([raw])` on a static
service over the same registry and store must give the same reply, body for body (log-probs
within 1e-4: another batch shape sums in another order)."""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import replace

import pytest

from handler.scheduler import Finished, TextDelta, Ticket
from handler.service import LoraplexService, RawRequest, Reply
from loraplex_testing.models import make_random_lora

PROMPTS = ["hello world", "the quick brown fox", "What is the capital", "numbers 0 1 2 3",
           "loraplex serves many tenants on one base model.", "ARR MATEY"]


@pytest.fixture(scope="module")
def more_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sched-adapters")
    return {"d": make_random_lora(tiny_model_dir, root / "d", r=4, alpha=16, seed=21),
            "e": make_random_lora(tiny_model_dir, root / "e", r=8, alpha=8, seed=22, targets=("q_proj", "o_proj"))}


@pytest.fixture
def pair(make_service, tiny_model_dir):
    """make(**overrides) -> (continuous service, static service over the same registry and store)."""
    made = []

    def make(**overrides):
        cont = make_service(scheduler="continuous", **overrides)
        static = LoraplexService.from_model_dir(tiny_model_dir, replace(cont.config, scheduler="static"))
        made.append(static)
        assert (cont.scheduler_kind, static.scheduler_kind) == ("continuous", "static")
        return cont, static

    yield make
    for svc in made:
        svc.stop()


def _raw(prompt, tenant=None, **fields):
    return RawRequest({"prompt": prompt, **fields}, {"X-Tenant-ID": tenant} if tenant else {})


def _drain(ticket: Ticket, timeout=60.0) -> tuple[list[TextDelta], Reply]:
    deltas = []
    while True:
        event = ticket.get(timeout=timeout)
        if isinstance(event, Finished):
            return deltas, event.reply
        deltas.append(event)


def _same(a, b, path="body"):
    """Equal, but for floats within 1e-4."""
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-4, (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, a, b)
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def _check_stream(deltas: list[TextDelta], reply: Reply) -> None:
    body = reply.body
    assert "".join(d.text for d in deltas) == body["text"]
    assert sum(len(d.token_ids) for d in deltas) == body["usage"]["completion_tokens"]
    if "logprobs" in body:
        joined = {k: [x for d in deltas for x in d.logprobs[k]] for k in ("tokens", "token_logprobs", "top_logprobs")}
        _same(joined, body["logprobs"])
    else:
        assert all(d.logprobs is None for d in deltas)


def _alone(static, raw: RawRequest, reply: Reply) -> Reply:
    """The static reference for `raw`, on the adapter version the continuous reply names."""
    body = dict(raw.body)
    adapter = reply.body.get("adapter", "base") if reply.status == 200 else "base"
    pinned_here = "@v" in adapter and "adapter" not in body
    if pinned_here:
        body["adapter"] = adapter  # a pin of that version gives the same body fields,
    ref = static.handle_batch([RawRequest(body, raw.headers)])[0]
    if pinned_here and ref.status == 200:  # but for why that version and task (the pin's own reasons)
        ref = replace(ref, body={**ref.body, "version_by": reply.body["version_by"], "route": reply.body["route"]})
    return ref


def _sample(svc, stop: threading.Event, seen: list) -> None:
    """Between steps, on the scheduler thread: running rows per adapter, held and resident adapters."""
    stepper, residency = svc.scheduler.stepper, svc.residency

    def look():
        names = {a["adapter"] for a in residency.snapshot()["resident"]}
        uses = {n: stepper.uses(n) for n in names | set(residency.held_ids())}
        return {"uses": {n: u for n, u in uses.items() if u}, "held": residency.held_ids(), "resident": names,
                "rows": stepper.rows(), "free": stepper.free_rows()}

    while not stop.is_set():
        seen.append(svc.scheduler.call(look))
        time.sleep(0.002)


@pytest.mark.parametrize("overlap,mixed", [("auto", "auto"), ("on", "on")], ids=["cpu-defaults", "gpu-defaults"])
def test_random_arrivals_equal_each_request_served_alone_by_the_static_path(pair, tools, tiny_adapters,
                                                                           more_adapters, overlap, mixed):
    """Rows from 4 threads at random times, 5 tenants on 2 resident slots (evictions), base and
    unknown-tenant rows, random lengths, stop strings, logprobs, seeded sampling, streaming; a new version of t-a
    is published while its v1 rows run. Every reply equals the request alone on the static path;
    every stream concatenates to its reply; an adapter with running rows is never evicted.
    `step_overlap: on` and `step_mixed: on` (the GPU defaults, here on the CPU): tokens reach the
    scheduler one step late, and joining rows' prompts ride in the decode steps."""
    cont, static = pair(num_slots=4, kv_rows=4, prefill_chunk=8, step_overlap=overlap, step_mixed=mixed,
                        mixed_prefill_tokens=6)
    assert cont.scheduler.stepper.overlap is (overlap == "on") and cont.scheduler.stepper.mixed is (mixed == "on")
    adapters = {"t-a": tiny_adapters["a"], "t-b": tiny_adapters["b"], "t-c": tiny_adapters["c"],
                "t-d": more_adapters["d"], "t-e": more_adapters["e"]}
    for tenant, path in adapters.items():
        tools.onboard(cont, tenant, path)
    rng = random.Random(13)
    tenants = [*adapters, None, "nobody"]

    def request(i, tenant=None, max_new=None):
        tenant = tenant if tenant is not None else rng.choice(tenants)
        fields = {"max_new_tokens": max_new or rng.randint(1, 24), "logprobs": rng.choice([0, 0, 1, 2]),
                  "stream": rng.random() < 0.5}
        if rng.random() < 0.25:  # seeded sampling: a row's draws are its own, whatever runs beside it
            fields.update(do_sample=True, temperature=rng.choice([0.7, 1.0, 1.3]), top_p=rng.choice([0.8, 1.0]),
                          seed=rng.randrange(1000))
        prompt = rng.choice(PROMPTS)
        if rng.random() < 0.4:  # a stop string taken from what the row will say, so cuts really happen
            text = _alone(static, _raw(prompt, tenant, **fields), Reply(200, "", {})).body["text"]
            if text:
                a = rng.randrange(len(text))
                fields["stop"] = [text[a:a + rng.randint(1, 3)], "zz"]
        return _raw(prompt, tenant, **fields)

    plan = [[request(i) for i in range(9)] for _ in range(4)]
    long_v1 = [request(0, "t-a", max_new=32) for _ in range(3)]
    results: list[tuple[RawRequest, str, list, Reply]] = []
    lock = threading.Lock()

    def client(raws, phase):
        for raw in raws:
            time.sleep(rng.random() * 0.01)
            out = cont.submit(raw)
            deltas, reply = _drain(out) if isinstance(out, Ticket) else ([], out)
            with lock:
                results.append((raw, phase, deltas, reply))

    seen: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(cont, stop, seen))
    sampler.start()
    v1_tickets = [cont.submit(raw) for raw in long_v1]
    threads = [threading.Thread(target=client, args=(raws, "mixed")) for raws in plan]
    for t in threads:
        t.start()
    tools.onboard(cont, "t-a", tiny_adapters["c"])  # t-a v2, published while its v1 rows run
    deadline = time.monotonic() + 10
    while cont.resolver.resolve("t-a").version != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    v2_tickets = [cont.submit(_raw(p, "t-a", max_new_tokens=12)) for p in PROMPTS[:3]]
    for t in threads:
        t.join()
    finished_v1 = [_drain(t) for t in v1_tickets]
    finished_v2 = [_drain(t) for t in v2_tickets]
    stop.set()
    sampler.join()

    for raw, (deltas, reply) in zip(long_v1, finished_v1):
        assert reply.status == 200 and reply.body["adapter"] == "t-a@v1"  # kept the version it started with
        results.append((raw, "v1", deltas, reply))
    for p, (deltas, reply) in zip(PROMPTS[:3], finished_v2):
        assert reply.status == 200 and reply.body["adapter"] == "t-a@v2"
        results.append((_raw(p, "t-a", max_new_tokens=12), "v2", deltas, reply))
    cut = 0
    for raw, _phase, deltas, reply in results:
        assert reply.status == 200, reply.body
        _same(reply.body, _alone(static, raw, reply).body)
        _check_stream(deltas, reply)
        cut += reply.body["finish_reason"] == "stop" and "stop" in raw.body
    assert len(results) == 42 and cut >= 3 and sum("seed" in raw.body for raw, *_ in results) >= 5
    pinned = [static.handle_batch([_raw(PROMPTS[0], "t-a", max_new_tokens=12, adapter=f"t-a@v{v}")])[0]
              for v in (1, 2)]
    assert pinned[0].body["text"] != pinned[1].body["text"]  # the versions really answer differently
    # The run really mixed things: several adapters ran at once, slots were reused, rows joined mid-run.
    counters = cont.describe()["counters"]
    assert counters["evictions_lru"] + counters["evictions_stale"] >= 3
    assert max(len(s["uses"]) for s in seen) >= 2 and max(s["rows"] for s in seen) >= 3
    for s in seen:  # an adapter with running rows is resident and held (never evicted under them)
        for name, uses in s["uses"].items():
            assert name in s["resident"] and s["held"].get(name) == uses, s
    idle = cont.scheduler.call(lambda: (cont.scheduler.stepper.free_rows(), cont.residency.held_ids()))
    assert idle == (4, {})
    assert (cont.scheduler.call(lambda: cont.scheduler.stepper.mixed_steps) > 0) is (mixed == "on")


def test_a_flooding_tenant_does_not_starve_another(pair, tools, tiny_adapters):
    cont, _ = pair(kv_rows=2)
    tools.onboard(cont, "flood", tiny_adapters["a"])
    tools.onboard(cont, "few", tiny_adapters["b"])
    order: list[str] = []
    lock = threading.Lock()
    slow = _slow_steps(cont, 0.01)  # the flood is queued long before it could drain
    tickets = [(t, cont.submit(_raw("hello world", t, max_new_tokens=8))) for t in ["flood"] * 40]
    done_before = cont.scheduler.finished
    tickets += [(t, cont.submit(_raw("hello world", t, max_new_tokens=8))) for t in ["few"] * 2]

    def wait(tenant, ticket):
        _drain(ticket)
        with lock:
            order.append(tenant)

    threads = [threading.Thread(target=wait, args=tt) for tt in tickets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slow.undo()
    positions = [i for i, t in enumerate(order) if t == "few"]
    assert done_before < 10 and len(order) == 42
    assert max(positions) < done_before + 8, (done_before, order)  # FIFO would finish them at 40 and 41


def test_tenant_max_running_caps_one_tenants_rows(pair, tools, tiny_adapters):
    cont, static = pair(kv_rows=4, tenant_max_running=1)
    tools.onboard(cont, "big", tiny_adapters["a"])
    tools.onboard(cont, "small", tiny_adapters["b"])
    seen: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(cont, stop, seen))
    sampler.start()
    raws = [_raw(p, "big", max_new_tokens=16) for p in PROMPTS] + [_raw(p, None, max_new_tokens=16) for p in PROMPTS]
    raws += [_raw(p, "small", max_new_tokens=16) for p in PROMPTS[:2]]
    tickets = [cont.submit(r) for r in raws]
    replies = [_drain(t)[1] for t in tickets]
    stop.set()
    sampler.join()
    assert all(r.status == 200 for r in replies)
    for raw, reply in zip(raws, replies):
        _same(reply.body, _alone(static, raw, reply).body)
    assert all(s["uses"].get("big@v1", 0) <= 1 and s["uses"].get("small@v1", 0) <= 1 for s in seen)
    assert all(s["rows"] <= 3 for s in seen)  # big, small and the base rows: one each
    assert any(s["uses"].get("big@v1") and s["uses"].get("small@v1") for s in seen)


def test_a_request_that_never_fits_gets_413_and_a_full_queue_503_with_retry_after(pair):
    cont, _ = pair(kv_rows=1, max_waiting=1, kv_max_len=40, retry_after_s=7)
    too_big = cont.submit(_raw("hello world", max_new_tokens=32))
    assert isinstance(too_big, Reply) and too_big.status == 413
    prompt = len(cont.tokenizer("hello world")["input_ids"])
    assert f"prompt of {prompt} tokens + max_new_tokens 32" in too_big.body["error"]
    assert "at most 40" in too_big.body["error"]
    slow = _slow_steps(cont, 0.02)
    first, second = (cont.submit(_raw("hello world", max_new_tokens=20)) for _ in range(2))
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    third = cont.submit(_raw("hello world", max_new_tokens=20))
    assert isinstance(third, Reply) and third.status == 503
    assert third.headers == {"Retry-After": "7"}
    assert "queue is full" in third.body["error"] and "max_waiting 1" in third.body["error"]
    assert [_drain(t)[1].status for t in (first, second)] == [200, 200]
    slow.undo()
    after = cont.submit(_raw("hello world", max_new_tokens=4))
    assert isinstance(after, Ticket) and _drain(after)[1].status == 200
    assert cont.describe()["scheduler"]["rejected_queue_full"] == 1


class _slow_steps:
    """The real stepper, each step delayed (so a row is still running when the test acts)."""

    def __init__(self, svc, seconds):
        self.stepper = svc.scheduler.stepper
        self.real = self.stepper.decode_phase

        def decode_phase():
            time.sleep(seconds)
            return self.real()

        self.stepper.decode_phase = decode_phase

    def undo(self):
        self.stepper.decode_phase = self.real


def test_cancel_and_timeout_free_the_kv_row_and_the_adapter_hold(pair, tools, tiny_adapters):
    cont, _ = pair(kv_rows=2, request_timeout_s=1.0)
    tools.onboard(cont, "acme", tiny_adapters["a"])
    stepper = cont.scheduler.stepper
    _slow_steps(cont, 0.05)  # 30 tokens: 1.5 s
    cancelled = cont.submit(_raw("hello world", "acme", max_new_tokens=30, stream=True))
    timed_out = cont.submit(_raw("the quick brown fox", "acme", max_new_tokens=30))
    assert isinstance(cancelled.get(timeout=10), TextDelta)  # it runs
    state = cont.scheduler.call(lambda: (stepper.rows(), cont.residency.held_ids()))
    assert state == (2, {"acme@v1": 2})
    cancelled.cancel()
    deltas, reply = _drain(cancelled)
    assert reply.status == 499 and reply.body["error"] == "cancelled"
    reply = _drain(timed_out)[1]
    assert reply.status == 504 and "request_timeout_s=1 s" in reply.body["error"]
    state = cont.scheduler.call(lambda: (stepper.free_rows(), cont.residency.held_ids()))
    assert state == (2, {})
    snap = cont.describe()["scheduler"]
    assert snap["cancelled"] == 1 and snap["timed_out"] == 1 and snap["running"] == 0


def test_a_step_failure_fails_its_rows_with_500_and_the_worker_lives(pair, tools, tiny_adapters):
    cont, static = pair()
    tools.onboard(cont, "acme", tiny_adapters["a"])
    stepper = cont.scheduler.stepper
    real = stepper.prefill_phase

    def broken():
        raise RuntimeError("kernel exploded at /secret/path/model.bin")

    stepper.prefill_phase = broken
    tickets = [cont.submit(_raw("hello world", t, max_new_tokens=6)) for t in ("acme", None)]
    replies = [_drain(t)[1] for t in tickets]
    assert [r.status for r in replies] == [500, 500] and all("/secret" not in r.body["error"] for r in replies)
    stepper.prefill_phase = real
    raw = _raw("hello world", "acme", max_new_tokens=6)
    reply = cont.handle_batch([raw])[0]
    _same(reply.body, _alone(static, raw, reply).body)
    assert cont.scheduler.call(lambda: (stepper.free_rows(), cont.residency.held_ids())) == (16, {})


def test_a_failure_handing_out_one_rows_token_ends_that_row_only(pair, tools, tiny_adapters):
    cont, static = pair()
    tools.onboard(cont, "acme", tiny_adapters["a"])
    sched = cont.scheduler
    real = sched._emit

    def emit(job, piece):
        if job.tenant == "acme":
            raise RuntimeError("detokeniser bug")
        return real(job, piece)

    sched._emit = emit
    try:
        bad, good = (cont.submit(_raw("hello world", t, max_new_tokens=6)) for t in ("acme", None))
        assert _drain(bad)[1].status == 500
        reply = _drain(good)[1]
    finally:
        sched._emit = real
    _same(reply.body, _alone(static, _raw("hello world", None, max_new_tokens=6), reply).body)
    assert sched.call(lambda: (sched.stepper.free_rows(), cont.residency.held_ids())) == (16, {})


def test_repeated_iteration_failures_end_every_row_instead_of_retrying_forever(pair, tools, tiny_adapters):
    cont, static = pair()
    tools.onboard(cont, "acme", tiny_adapters["a"])
    sched = cont.scheduler
    real = sched._admit

    def admit():
        raise RuntimeError("admission bug")

    sched._admit = admit
    try:
        tickets = [cont.submit(_raw("hello world", t, max_new_tokens=6)) for t in ("acme", None)]
        assert [_drain(t, timeout=30)[1].status for t in tickets] == [500, 500]
    finally:
        sched._admit = real
    raw = _raw("hello world", "acme", max_new_tokens=6)
    reply = cont.handle_batch([raw])[0]  # and it serves on
    _same(reply.body, _alone(static, raw, reply).body)


def test_every_slot_held_keeps_the_row_waiting_while_others_run(pair, tools, tiny_adapters, more_adapters):
    """2 resident slots held by running rows of 2 tenants: a third tenant's row waits (no eviction
    under running rows) while base rows are admitted, and runs once a slot is released."""
    cont, static = pair(num_slots=4, kv_rows=4)
    for tenant, path in (("t-a", tiny_adapters["a"]), ("t-b", tiny_adapters["b"]), ("t-c", more_adapters["d"])):
        tools.onboard(cont, tenant, path)
    slow = _slow_steps(cont, 0.02)
    raws = [_raw("hello world", "t-a", max_new_tokens=30), _raw("hello world", "t-b", max_new_tokens=30),
            _raw("hello world", "t-c", max_new_tokens=4), _raw("the quick brown fox", None, max_new_tokens=4)]
    tickets = [cont.submit(r) for r in raws[:2]]
    assert all(isinstance(t.get(timeout=10), TextDelta) for t in tickets)  # both running, both slots held
    tickets += [cont.submit(r) for r in raws[2:]]
    base_reply = _drain(tickets[3])[1]
    assert base_reply.status == 200
    waiting = cont.scheduler.call(lambda: (cont.scheduler.waiting_rows, sorted(cont.residency.held_ids())))
    assert waiting == (1, ["t-a@v1", "t-b@v1"])  # t-c waits; nothing held was evicted
    slow.undo()
    replies = [_drain(t)[1] for t in tickets[:3]] + [base_reply]
    for raw, reply in zip(raws, replies):
        assert reply.status == 200
        _same(reply.body, _alone(static, raw, reply).body)


def _finish_order(tickets: list[tuple[str, Ticket]]) -> tuple[list[str], dict[int, Reply]]:
    """Drain every ticket on its own thread: the labels in the order their requests finished, and
    the replies by position."""
    order: list[str] = []
    replies: dict[int, Reply] = {}
    lock = threading.Lock()

    def wait(i, label, ticket):
        reply = _drain(ticket)[1]
        with lock:
            order.append(label)
            replies[i] = reply

    threads = [threading.Thread(target=wait, args=(i, *lt)) for i, lt in enumerate(tickets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return order, replies


def test_a_freed_slot_goes_to_the_adapter_the_most_waiting_rows_need(pair, tools, tiny_adapters, more_adapters):
    """2 slots held by t-a and t-b; t-c (1 row, first in turn) and t-d (2 rows) wait. When t-b's
    slot frees, t-d's adapter is loaded first (one load starts both its rows); t-c follows."""
    cont, static = pair(num_slots=4, kv_rows=4, admission_max_wait_s=60)
    for tenant, path in (("t-a", tiny_adapters["a"]), ("t-b", tiny_adapters["b"]), ("t-c", more_adapters["d"]),
                         ("t-d", more_adapters["e"])):
        tools.onboard(cont, tenant, path)
    slow = _slow_steps(cont, 0.02)
    raws = [_raw("hello world", "t-a", max_new_tokens=32), _raw("hello world", "t-b", max_new_tokens=10)]
    tickets = [(r.headers["X-Tenant-ID"], cont.submit(r)) for r in raws]
    assert all(isinstance(t.get(timeout=10), TextDelta) for _, t in tickets)  # both running, both slots held
    raws += [_raw("hello world", "t-c", max_new_tokens=4)] + [_raw(p, "t-d", max_new_tokens=4) for p in PROMPTS[:2]]
    tickets += [(r.headers["X-Tenant-ID"], cont.submit(r)) for r in raws[2:]]
    order, replies = _finish_order(tickets)
    slow.undo()
    assert order.index("t-c") > max(i for i, t in enumerate(order) if t == "t-d"), order  # turn order: t-c first
    for i, raw in enumerate(raws[2:], 2):
        assert replies[i].status == 200
        _same(replies[i].body, _alone(static, raw, replies[i]).body)


@pytest.mark.parametrize("max_wait", [0.3, 0])
def test_an_overdue_adapter_drains_a_busy_one(pair, tools, tiny_adapters, more_adapters, max_wait):
    """One slot, held without a break by a flood of t-a rows (2 KV rows). t-c's row waits for a slot;
    past admission_max_wait_s t-a drains (its new rows wait) and t-c runs long before the flood
    ends. With no bound (0) it would wait for the whole flood."""
    cont, static = pair(num_slots=3, kv_rows=2, admission_max_wait_s=max_wait)
    tools.onboard(cont, "t-a", tiny_adapters["a"])
    tools.onboard(cont, "t-c", more_adapters["d"])
    slow = _slow_steps(cont, 0.03)
    flood = [("t-a", cont.submit(_raw("hello world", "t-a", max_new_tokens=8)))]
    assert isinstance(flood[0][1].get(timeout=10), TextDelta)  # t-a holds the one slot
    # the rest of the flood once the first row runs: its two KV rows start (and so end) at different
    # steps, so the slot never frees between two t-a rows and only a drain can give it to t-c
    flood += [("t-a", cont.submit(_raw("hello world", "t-a", max_new_tokens=8))) for _ in range(15)]
    late = _raw("hello world", "t-c", max_new_tokens=4)
    order, replies = _finish_order(flood + [("t-c", cont.submit(late))])
    slow.undo()
    drains = cont.scheduler.snapshot()["drains"]
    if max_wait:
        assert order.index("t-c") < 10 and drains >= 1, order
    else:
        assert order[-1] == "t-c" and drains == 0, order
    assert all(r.status == 200 for r in replies.values())
    _same(replies[16].body, _alone(static, late, replies[16]).body)


@pytest.mark.parametrize("preempt", [4, 0])
def test_a_drain_preempts_the_drained_adapters_long_greedy_rows(pair, tools, tiny_adapters, more_adapters, preempt):
    """One slot, held by three long t-a rows (32 tokens: streamed with log-probs, plain, seeded
    sampling). t-c's row becomes overdue and t-a drains. With drain_preempt_tokens 4 the two greedy
    rows leave at once (the sampled one runs on: its generator would not survive a resume), t-c
    runs as soon as the sampled row ends, and the preempted rows resume after it, each reply (and
    the stream, token for token with log-probs) equal to the request alone. With 0 nothing is
    preempted and t-c waits for every t-a row."""
    cont, static = pair(num_slots=3, kv_rows=4, admission_max_wait_s=0.3, drain_preempt_tokens=preempt)
    tools.onboard(cont, "t-a", tiny_adapters["a"])
    tools.onboard(cont, "t-c", more_adapters["d"])
    slow = _slow_steps(cont, 0.03)
    longs = [_raw("hello world", "t-a", max_new_tokens=32, stream=True, logprobs=2),
             _raw("the quick brown fox", "t-a", max_new_tokens=32),
             _raw("numbers 0 1 2 3", "t-a", max_new_tokens=32, do_sample=True, temperature=1.2, seed=7)]
    streamed: list = []
    first = cont.submit(longs[0])
    assert isinstance(first, Ticket), first.body
    event = first.get(timeout=10)
    assert isinstance(event, TextDelta)  # t-a holds the one slot
    streamed.append(event)
    tickets = [cont.submit(raw) for raw in longs[1:]]
    late = _raw("hello world", "t-c", max_new_tokens=4)
    done: dict[str, tuple[float, Reply]] = {}
    lock = threading.Lock()

    def wait(label, ticket, into=None):
        deltas, reply = _drain(ticket)
        with lock:
            done[label] = (time.monotonic(), reply)
            if into is not None:
                into.extend(deltas)

    threads = [threading.Thread(target=wait, args=("a0", first, streamed)),
               *(threading.Thread(target=wait, args=(f"a{i}", t)) for i, t in enumerate(tickets, 1)),
               threading.Thread(target=wait, args=("c", cont.submit(late)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slow.undo()
    snap = cont.scheduler.snapshot()
    assert snap["drains"] >= 1
    if preempt:
        assert snap["preempted"] == 2, snap
        assert done["c"][0] < min(done["a0"][0], done["a1"][0]), done  # the preempted rows resumed after t-c
    else:
        assert snap["preempted"] == 0 and done["c"][0] > max(done[k][0] for k in ("a0", "a1", "a2")), done
    assert snap["free_rows_waiting"] > 0  # t-c waited for the slot with a KV row free
    for label, raw in (("a0", longs[0]), ("a1", longs[1]), ("a2", longs[2]), ("c", late)):
        reply = done[label][1]
        assert reply.status == 200, reply.body
        _same(reply.body, _alone(static, raw, reply).body)
    _check_stream(streamed, done["a0"][1])
    assert cont.scheduler.call(lambda: (cont.scheduler.stepper.free_rows(), cont.residency.held_ids())) == (4, {})


def test_a_ticket_submitted_with_an_event_loop_is_read_with_await(pair):
    cont, static = pair()
    raw = _raw("hello world", max_new_tokens=10, stream=True, logprobs=1)

    async def main():
        ticket = cont.submit(raw, asyncio.get_running_loop())
        with pytest.raises(RuntimeError):
            ticket.get()
        events = []
        while not events or not isinstance(events[-1], Finished):
            events.append(await asyncio.wait_for(ticket.next(), 30))
        return ticket, events

    ticket, events = asyncio.run(main())
    assert ticket.stream is True
    reply = events[-1].reply
    _check_stream(events[:-1], reply)
    _same(reply.body, _alone(static, raw, reply).body)


def test_static_mode_and_the_peft_engine_have_no_submit(make_service):
    static = make_service(scheduler="static")
    with pytest.raises(RuntimeError, match="scheduler: continuous"):
        static.submit(_raw("hello"))
    peft = make_service(engine="peft")
    assert peft.scheduler_kind == "static" and peft.describe()["scheduler"]["kind"] == "static"
    assert peft.handle_batch([_raw("hello", max_new_tokens=3)])[0].status == 200


def test_a_stop_string_ends_the_row_at_once(pair):
    """The row leaves the stepper at the step that completes the stop string, not at max_new_tokens."""
    cont, static = pair()
    alone = static.handle_batch([_raw("hello world", max_new_tokens=32)])[0].body
    assert alone["finish_reason"] == "length" and len(alone["text"]) > 6
    raw = _raw("hello world", max_new_tokens=32, stop=[alone["text"][2:4]])
    steps = cont.scheduler.steps
    reply = _drain(cont.submit(raw))[1]
    _same(reply.body, _alone(static, raw, reply).body)
    kept = reply.body["usage"]["completion_tokens"]
    assert reply.body["finish_reason"] == "stop" and kept < 32
    assert cont.scheduler.steps - steps <= kept + 2  # a stop can need a token or two past the cut to be sure
    assert cont.scheduler.call(cont.scheduler.stepper.free_rows) == 16


def test_a_held_adapter_outlives_its_idle_ttl(pair, tools, tiny_adapters, caplog):
    """idle_ttl_s shorter than a row: idle eviction (each loop, registry sync) skips an adapter a
    running row holds, and takes it once the row has finished and it has been idle that long."""
    cont, static = pair(idle_ttl_s=0.3)
    tools.onboard(cont, "acme", tiny_adapters["a"])
    slow = _slow_steps(cont, 0.03)
    raw = _raw("hello world", "acme", max_new_tokens=30)
    reply = _drain(cont.submit(raw))[1]  # about 0.9 s after the adapter was acquired; idle from its release
    slow.undo()
    assert reply.status == 200 and cont.describe()["counters"]["evictions_idle"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # nor tried (the engine would refuse)
    _same(reply.body, _alone(static, raw, reply).body)
    time.sleep(0.5)
    assert cont.describe()["counters"]["evictions_idle"] == 1 and cont.describe()["resident"] == []


def test_scheduler_metrics_per_row_and_rate_limited_gauges(pair, tools, tiny_adapters):
    from handler import metrics

    cont, _ = pair(kv_rows=2)
    tools.onboard(cont, "acme", tiny_adapters["a"])
    assert _drain(cont.submit(_raw("hello", "acme", max_new_tokens=2)))[1].status == 200  # acme's adapter in a slot
    time.sleep(0.05)
    seen = []

    class Sink:
        def record(self, metric, value, labels):
            seen.append((metric.name, value, tuple(labels)))

    cont.metrics.sinks.append(Sink())
    slow = _slow_steps(cont, 0.01)
    started = time.monotonic()
    tickets = [cont.submit(_raw(p, "acme", max_new_tokens=12)) for p in PROMPTS[:4]]
    replies = [_drain(t)[1] for t in tickets]
    took = time.monotonic() - started
    slow.undo()
    time.sleep(0.05)
    assert all(r.status == 200 for r in replies)
    by = lambda m: [(v, labels) for name, v, labels in seen if name == m.name]  # noqa: E731
    assert [labels for _, labels in by(metrics.REQUESTS)] == [("acme", "default", "v1")] * 4
    assert sum(v for v, _ in by(metrics.GENERATED_TOKENS)) == sum(r.body["usage"]["completion_tokens"] for r in replies)
    ttft, itl = [v for v, _ in by(metrics.TTFT_SECONDS)], [v for v, _ in by(metrics.ITL_SECONDS)]
    assert len(ttft) == len(itl) == 4 and all(0 < v < 5 for v in ttft) and all(0.005 < v < 1 for v in itl)
    running = [v for v, _ in by(metrics.RUNNING)]
    # ~25 steps: an update when it got busy, one each time its waiting list changed (acme's rows
    # started waiting, the last of them was admitted: the LoRA gauge's lists go out within 50 ms),
    # at most one a second after, and one going idle
    assert 2 <= len(running) <= 4 + took / metrics.GAUGE_INTERVAL_S and running[0] >= 1 and running[-1] == 0
    lora = [labels for _, labels in by(metrics.LORA_INFO)]
    assert any(labels[2] == "acme" for labels in lora)  # 2 of the 4 rows waited for a KV row
    assert lora[-1][2] == metrics.EMPTY_LIST
    assert all(labels[1] == "acme" for labels in lora)  # its adapter is loaded and ready throughout
    assert by(metrics.WAITING)[-1][0] == 0 and 0 <= max(v for v, _ in by(metrics.KV_CACHE)) <= 1


def test_an_adapter_a_waiting_row_needs_is_not_the_lru_victim(pair, tools, tiny_adapters, more_adapters):
    """2 slots, one row at a time: a1 runs; b1, c1, a2 wait. c1's load must evict A or B: A is the
    least recently used, but a2 waits for it, so B goes (3 loads in all, not 4)."""
    cont, static = pair(num_slots=4, kv_rows=1)
    for tenant, path in (("t-a", tiny_adapters["a"]), ("t-b", tiny_adapters["b"]), ("t-c", more_adapters["d"])):
        tools.onboard(cont, tenant, path)
    slow = _slow_steps(cont, 0.02)
    raws = [_raw("hello world", t, max_new_tokens=6) for t in ("t-a", "t-b", "t-c", "t-a")]
    first = cont.submit(raws[0])
    assert isinstance(first.get(timeout=10), TextDelta)  # a1 runs: the others queue behind it
    tickets = [first] + [cont.submit(r) for r in raws[1:]]
    replies = [_drain(t)[1] for t in tickets]
    slow.undo()
    for raw, reply in zip(raws, replies):
        _same(reply.body, _alone(static, raw, reply).body)
    counters = cont.describe()["counters"]
    assert (counters["loads"], counters["evictions_lru"]) == (3, 1)


def test_a_bug_in_one_iteration_does_not_stop_the_scheduler(pair, monkeypatch):
    cont, static = pair()
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("a bug after the step")

    monkeypatch.setattr(cont.metrics, "scheduler_step", broken)
    raw = _raw("hello world", max_new_tokens=5)
    reply = _drain(cont.submit(raw))[1]
    _same(reply.body, _alone(static, raw, reply).body)
    assert len(calls) >= 5


def test_openai_routes_get_the_static_paths_replies(pair, tools, tiny_adapters):
    """The OpenAI exchange renders the continuous reply exactly as the static one (but for its
    random id and clock), errors in OpenAI's shape included."""
    cont, static = pair(kv_max_len=40)
    tools.onboard(cont, "acme", tiny_adapters["a"])
    raws = [RawRequest({"model": "acme", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
                        "temperature": 0, "logprobs": True, "top_logprobs": 2}, {"url_path": "v1/chat/completions"}),
            RawRequest({"model": "acme", "prompt": "the quick", "max_tokens": 8, "temperature": 0, "stop": ["a"]},
                       {"url_path": "v1/completions"}),
            RawRequest({"model": "base", "prompt": "hello", "max_tokens": 8, "temperature": 0, "stream": True},
                       {"url_path": "v1/completions"}),
            RawRequest(None, {"url_path": "v1/models", "X-Tenant-ID": "acme"})]
    for raw in raws:
        out = cont.submit(raw)
        deltas, reply = _drain(out) if isinstance(out, Ticket) else ([], out)
        alone = static.handle_batch([raw])[0]
        assert reply.status == alone.status == 200
        strip = lambda b: {k: v for k, v in b.items() if k not in ("id", "created")}  # noqa: E731
        _same(strip(reply.body), strip(alone.body))
        if isinstance(out, Ticket):
            choice = reply.body["choices"][0]
            assert "".join(d.text for d in deltas) == choice.get("text", choice.get("message", {}).get("content"))
    too_big = cont.submit(RawRequest({"model": "acme", "prompt": PROMPTS[4], "max_tokens": 32},
                                     {"url_path": "v1/completions"}))
    assert too_big.status == 413 and "kv_max_len" in too_big.body["error"]["message"]


def test_a_new_rows_first_token_goes_out_before_the_steps_decode_forward(pair):
    """A row whose prompt completes in a step is handed out after the step's prefill half, before its
    decode half runs the other rows' forward: here every decode half that follows a first token is
    slowed by DECODE_S, and a one-token request joining a running row still finishes well within it
    (handing events out after the whole step, it would wait DECODE_S)."""
    DECODE_S = 2.0
    cont, _ = pair(kv_rows=4)
    stepper = cont.scheduler.stepper
    real_prefill, real_decode = stepper.prefill_phase, stepper.decode_phase
    gave_first_tokens = []

    def prefill_phase():
        events = real_prefill()
        gave_first_tokens.append(bool(events))
        return events

    def decode_phase():
        if gave_first_tokens and gave_first_tokens[-1]:
            time.sleep(DECODE_S)
        return real_decode()

    stepper.prefill_phase, stepper.decode_phase = prefill_phase, decode_phase
    try:
        running = cont.submit(_raw("hello world", max_new_tokens=30))
        assert isinstance(running.get(timeout=30), TextDelta)  # it decodes
        t0 = time.monotonic()
        _, reply = _drain(cont.submit(_raw("the quick brown fox", max_new_tokens=1)))
        elapsed = time.monotonic() - t0
        assert reply.status == 200 and reply.body["usage"]["completion_tokens"] == 1
        assert elapsed < DECODE_S / 2, elapsed
        assert _drain(running)[1].status == 200
    finally:
        stepper.prefill_phase, stepper.decode_phase = real_prefill, real_decode


def test_the_scheduler_threads_time_is_charged_to_its_loop_phases(pair, tools, tiny_adapters):
    """describe's `scheduler.thread_s`: every phase of the loop, the steps' halves charged while rows
    run, an adapter load in admission, and no more time in all than the thread has lived."""
    cont, _ = pair()
    tools.onboard(cont, "acme", tiny_adapters["a"])
    start = time.perf_counter()
    before = cont.describe()["scheduler"]["thread_s"]
    for tenant in ("acme", None, "acme"):
        _, reply = _drain(cont.submit(_raw("hello world", tenant)))
        assert reply.status == 200
    after = cont.describe()["scheduler"]["thread_s"]
    spent = {k: after[k] - before[k] for k in after}
    assert set(after) == {"idle", "inbox", "sync", "admit", "prefill", "first_tokens", "decode", "tokens", "deliver",
                          "gauges"}
    assert all(v >= 0 for v in spent.values()) and spent["prefill"] > 0 and spent["decode"] > 0, spent
    assert spent["admit"] > 0 and spent["idle"] > 0, spent
    assert sum(spent.values()) <= time.perf_counter() - start + 0.01, spent
