"""The per-step scheduler (`scheduler: continuous`): requests join and leave the engine between
any two steps, and their text streams out as it is produced.

    submit (any thread) ─► inbox ─► waiting (per tenant, FIFO) ─► admitted round-robin across
    tenants while the stepper has free KV rows (adapter held through the residency) ─► one step
    for every running row (its prefill half's first tokens handed out before its decode half
    runs; with the stepper's overlap every event comes a step late instead) ─► tokens →
    `TextStream` → `TextDelta`s ─► the row's end (EOS, length, a stop string, cancel, timeout)
    ─► `Finished` with the reply the static path would give (built by the same service code)
    ─► hold released, KV row free.

Admission, every loop iteration: tenants take turns (base-model rows count as one tenant), a
tenant with `tenant_max_running` rows running is skipped (0 = no cap), and a row whose adapter
cannot be made resident because every slot is held by running rows stays waiting while other
tenants' rows are admitted. A load failure follows `load_failure_policy` exactly as the static
path does (the service's `adapter_for`). A row is served with the adapter version its request was
planned with at submit and holds it while it runs: a version published meanwhile serves only
requests submitted after it, and the old one leaves its slot at its last row's release.
Victims for a load are taken among adapters no waiting row needs first (`residency.wanted`).

Which adapter gets a slot (`_slot_plan`, once per iteration): while the slots are all held, rows
on other adapters wait; when one frees, the adapter that the most waiting rows need is loaded
first (one load then starts them all), not the first tenant's in turn, because on a CPU a decode
step costs about the same for few rows as for many. So that no tenant starves, an adapter whose
oldest waiting row has waited `admission_max_wait_s` goes before every other (oldest first), and
while such an adapter finds every slot held, one resident adapter is drained (few waiting rows,
running rows that finish soon): its new rows wait (its running rows finish) until its slot is free
for the overdue one; the drain lasts until the overdue adapter is resident. With
`drain_preempt_tokens` > 0 (off by default: README, Decisions) the drained adapter's greedy rows
with more than that many tokens to go do not finish first: they are preempted (`_preempt`: back
to the front of their tenant's queue, resumed later from their prompt plus the tokens they
produced, which the stepper prefills again), so the slot frees within about that many steps.
`tenant_max_running` and the turns between tenants apply as before among the rows that may start.

Fan-out requests (a fallback chain or compare mode, handler/fanout.py) are one `_Group` of rows,
one `_Job` per row sharing the request's ticket: the group waits as one entry of its tenant's queue
and is admitted all or none (a KV row for each, each row's adapter held; short of either, nothing
is taken and it keeps its turn), its rows stream nothing, and the request finishes when its last
row does, with `fanout.merge`'s reply. A cancel, a timeout or an error of any row ends every row
of the group (KV rows and holds freed) with that one error reply.

Concurrency (the rules every method here keeps):
- One scheduler thread owns the engine, its `RowStepper` and the residency: every load,
  eviction, warmup, prefetch, registry-change application and step runs on it. A load's store
  read (file or object-store read, sha256) and the adapter's slot image (checks, dtype
  conversion, transpose) run on the residency's fetch thread (`adapter_fetch.AdapterFetcher`); the
  row waits meanwhile (`AdapterFetching`) and the others step; the copy into the slot runs here.
- Any thread may call `Scheduler.submit` (through `LoraplexService.submit`), `Ticket.cancel`,
  `Scheduler.call` (runs a function on the scheduler thread between two steps and waits for its
  result: the service's describe) and `Scheduler.snapshot` (counters read under the lock).
  They only touch the inbox and the counters, both under `_lock`.
- A ticket's events go to its own queue: a `queue.SimpleQueue` (`Ticket.get`), or the asyncio
  queue of the event loop it was submitted with (`Ticket.next`), handed over at the end of each
  scheduler iteration with one `loop.call_soon_threadsafe` per loop for all of them (`_Outbox`).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Union

from .engine.api import GenerationOutput, GenerationRow, RowEvent, RowStepper, SamplingParams
from .engine.errors import CacheFull, RowTooLong
from .errors import QueueFull, RequestCancelled, RequestTimedOut, RequestTooLarge, WorkerStopping
from . import fanout
from .residency import AdapterNotReady
from .routes import Exchange
from .text_stream import Piece, TextStream, logprobs_body

if TYPE_CHECKING:
    from .service import LoraplexService, Plan, Reply

log = logging.getLogger(__name__)

BASE_ROWS = ""  # the fairness key of rows on the base model (no tenant id is empty)
SYNC_INTERVAL_S = 0.25  # registry changes and idle eviction at most this often while rows run
IDLE_WAIT_S = 1.0  # an idle scheduler wakes this often for idle eviction
MAX_FAILED_ITERATIONS = 3  # consecutive failed loop iterations after which every row ends with 500


@dataclass(frozen=True)
class TextDelta:
    text: str  # new visible text (held back: an incomplete UTF-8 char, a prefix of a stop string)
    token_ids: tuple[int, ...]  # tokens this delta covers
    logprobs: dict | None  # our JSON API's logprobs shape for these tokens when asked


@dataclass(frozen=True)
class Finished:
    reply: "Reply"  # exactly what handle_batch would return for this request (errors included)


Event = Union[TextDelta, Finished]  # every ticket ends with exactly one Finished


class Ticket:
    """One submitted request's events: `TextDelta`s (concatenated, the reply's text), then one
    `Finished`. A ticket submitted with an event loop is read with `next`, otherwise with `get`."""

    def __init__(self, exchange: Exchange, scheduler: "Scheduler",
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.exchange = exchange
        self.stream = bool(getattr(exchange.request, "stream", False))
        self._scheduler = scheduler
        self._loop = loop
        self._sync: queue.SimpleQueue | None = queue.SimpleQueue() if loop is None else None
        self._async: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._job: _Job | None = None  # scheduler thread only

    def cancel(self) -> None:
        """Any thread: the row leaves at the next step (its KV row and adapter hold freed) and a
        Finished (499) follows; no-op once finished."""
        self._scheduler.cancel(self)

    def get(self, timeout: float | None = None) -> Event:
        """Blocking; `queue.Empty` after `timeout` seconds without an event."""
        if self._sync is None:
            raise RuntimeError("this ticket was submitted with an event loop: await ticket.next()")
        return self._sync.get(timeout=timeout)

    async def next(self) -> Event:
        if self._async is None:
            raise RuntimeError("this ticket was submitted without an event loop: use ticket.get()")
        return await self._async.get()

    def _put(self, event: Event) -> bool:
        """Scheduler thread: deliver (an event-loop ticket's at the scheduler's next `_Outbox.flush`,
        the end of its loop iteration); False when the ticket's event loop is gone (nobody reads)."""
        if self._sync is not None:
            self._sync.put(event)
            return True
        if self._loop.is_closed():
            return False
        self._scheduler._outbox.add(self._loop, self._async, event)
        return True


class _Outbox:
    """Events for tickets read on event loops, handed over once per scheduler iteration: ONE
    ``call_soon_threadsafe`` per loop for every event of the iteration (in order), instead of one per
    token, each of which wakes the loop's thread (a self-pipe write) to contend for the GIL while the
    scheduler thread runs the next step. Scheduler thread only."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue, event: Event) -> None:
        self._by_loop.setdefault(loop, []).append((q, event))

    def flush(self) -> None:
        pending, self._by_loop = self._by_loop, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop closed since: nobody reads these (their rows end at their next token)
                log.warning("an event loop closed with %d undelivered events", len(items))


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for q, event in items:
        q.put_nowait(event)


@dataclass(eq=False)
class _Job:
    """A request from submit to Finished (scheduler thread, but for the fields set in submit)."""

    plan: "Plan"
    ticket: Ticket
    tenant: str  # fairness key: the tenant id, BASE_ROWS for base-model rows
    params: SamplingParams
    stream: TextStream
    arrived: float
    deadline: float | None
    row_id: int | None = None  # set while running
    adapter: str | None = None  # the held adapter while running (None: base)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    done: bool = False
    group: "_Group | None" = None  # a fan-out request's rows (handler/fanout.py); None = a one-row request
    index: int = 0  # the row's place in its group (link order)
    preempted: int = 0  # times taken out of the stepper to free its adapter's slot (it resumes where it was)
    waiting_since: float | None = None  # when it last joined the waiting queue, if after a preemption

    @property
    def preemptible(self) -> bool:
        """A one-row greedy request: resumed from its prompt and tokens it gets the same next tokens
        (a sampled row's generator state would not survive; a fan-out group runs all or none)."""
        return self.group is None and not self.params.do_sample


@dataclass(eq=False)
class _Group:
    """A fan-out request (scheduler thread, but for the fields set in submit): its rows' jobs in
    link order (the first one stands in the waiting queue and holds the ticket) and their results."""

    plan: "Plan"
    jobs: list[_Job]
    results: dict[int, "fanout.RowResult"] = field(default_factory=dict)
    finished: bool = False


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class ThreadTime:
    """Where the scheduler thread's wall time goes, in seconds per phase of its loop (`PHASES`):
    what describe reports (`scheduler.thread_s`) and the serving bench compares with the GPU's
    work. `mark(phase)` charges the time since the previous mark to `phase`. Scheduler thread
    only; read by `snapshot` (a copy of floats: a torn read is off by one iteration at most)."""

    PHASES = ("idle", "inbox", "sync", "admit", "prefill", "first_tokens", "decode", "tokens", "deliver", "gauges")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self._at = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._at
        self._at = now


@dataclass(frozen=True)
class _Cancel:
    ticket: Ticket
    error: BaseException


@dataclass(frozen=True)
class _SlotPlan:
    """Which waiting rows may take a slot this iteration (`Scheduler._slot_plan`): rows on a resident
    adapter may start, except on a `draining` one; a row on another adapter only when it is one of
    `loads` (the adapters the free slots go to)."""

    loads: frozenset[str] = frozenset()
    draining: str | None = None


class Scheduler:
    """`service`: the LoraplexService whose plans it serves (its `answer`, `adapter_for`, `failed`,
    `record_streamed`, `residency`, `metrics`, tokenizer text, and `config.admission_max_wait_s`).
    `stepper`: built from the engine by the constructing thread and touched only by the scheduler
    thread once `start` ran."""

    def __init__(self, service: "LoraplexService", stepper: RowStepper, *, max_waiting: int,
                 retry_after_s: int, tenant_max_running: int, request_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._service = service
        self.stepper = stepper
        self.max_in_flight = stepper.limits.max_rows + max_waiting
        self.retry_after_s = retry_after_s
        self.tenant_max_running = tenant_max_running
        self.request_timeout_s = request_timeout_s
        self.admission_max_wait_s = service.config.admission_max_wait_s
        self._clock = clock
        self._lock = threading.Condition()
        self._inbox: deque[_Job | _Cancel | _Call] = deque()
        self._in_flight = 0  # submitted, not finished (under _lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        # scheduler thread only:
        self._waiting: OrderedDict[str, deque[_Job]] = OrderedDict()  # tenant -> FIFO; order = turn
        self._running: dict[int, _Job] = {}
        self._running_by_tenant: Counter[str] = Counter()
        self._row_ids = itertools.count()
        self._synced_at = float("-inf")
        self._outbox = _Outbox()  # event-loop tickets' events, flushed once per loop iteration
        self._draining: str | None = None  # the resident adapter drained for an overdue one (`_slot_plan`)
        self._drain_for: str | None = None  # that overdue adapter
        service.residency.wanted = self._wanted  # victims are taken among adapters no waiting row needs first
        # store reads off this thread: a row whose adapter is in neither tier waits while it is read
        self.fetcher = service.residency.read_in_background()
        # counters (written by the scheduler thread, read by snapshot)
        self.steps = 0
        self.admitted = 0
        self.finished = 0
        self.cancelled = 0
        self.timed_out = 0
        self.rejected_full = 0
        self.drains = 0  # resident adapters drained for an overdue one
        self.preempted = 0  # rows taken out of the stepper for a drain (`_preempt`)
        self.drain_preempt_tokens = service.config.drain_preempt_tokens
        self.free_rows_waiting = 0  # KV rows left free at a step while requests waited (summed over steps)
        self.waiting_rows = 0
        self.running_rows = 0
        self.thread_time = ThreadTime()

    # -- any thread --------------------------------------------------------------

    def start(self, setup: Callable[[], None] = lambda: None) -> None:
        """Start the thread; it runs `setup` (warmup, prefetch) first. Returns when setup is done,
        raising what it raised."""
        self._thread = threading.Thread(target=self._run, args=(setup,), name="loraplex-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._setup_error is not None:
            self._thread.join()
            raise self._setup_error

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every request (503 `WorkerStopping`) and end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, plan: "Plan", loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue a planned, tokenized request; QueueFull when `kv_rows + max_waiting` are in flight."""
        ticket = Ticket(plan.exchange, self, loop)
        now = self._clock()
        deadline = now + self.request_timeout_s if self.request_timeout_s > 0 else None
        service = self._service

        def job_for(row: "Plan", tenant: str) -> _Job:
            return _Job(row, ticket, tenant, fanout.row_sampling(plan, service.sampling(row.request)),
                        TextStream(service.decode, tuple(row.request.stop), hold_spaces=service.hold_spaces),
                        now, deadline)

        if plan.fanout is None:
            job = job_for(plan, plan.record.tenant_id if plan.record is not None else BASE_ROWS)
        else:  # every row counts as the tenant's, base rows included (all are the tenant's own links)
            group = _Group(plan, [job_for(row, plan.request.tenant) for row in fanout.row_plans(plan)])
            for index, member in enumerate(group.jobs):
                member.group, member.index = group, index
            job = group.jobs[0]
        ticket._job = job
        with self._lock:
            if self._stopping:
                raise WorkerStopping("the worker is stopping; retry on another")
            if self._in_flight >= self.max_in_flight:
                self.rejected_full += 1
                raise QueueFull(f"the queue is full: {self._in_flight} requests are running or waiting "
                                f"(kv_rows {self.stepper.limits.max_rows} + max_waiting "
                                f"{self.max_in_flight - self.stepper.limits.max_rows}); "
                                f"retry after {self.retry_after_s} s", self.retry_after_s)
            self._in_flight += 1
            self._inbox.append(job)
            self._lock.notify_all()
        return ticket

    def cancel(self, ticket: Ticket, error: BaseException | None = None) -> None:
        with self._lock:
            self._inbox.append(_Cancel(ticket, error or RequestCancelled("cancelled")))
            self._lock.notify_all()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the scheduler thread between two steps and return its result (directly when
        called there, or when the thread is not running: then no other thread uses the engine)."""
        if self._thread is None or self._thread is threading.current_thread() or not self._thread.is_alive():
            return fn()
        call = _Call(fn)
        with self._lock:
            self._inbox.append(call)
            self._lock.notify_all()
        while not call.done.wait(1.0):
            if not self._thread.is_alive():  # it ended before taking the call
                return fn()
        if call.error is not None:
            raise call.error
        return call.result

    def snapshot(self) -> dict:
        with self._lock:
            in_flight = self._in_flight
        return {"running": self.running_rows, "waiting": self.waiting_rows, "in_flight": in_flight,
                "max_in_flight": self.max_in_flight, "tenant_max_running": self.tenant_max_running,
                "request_timeout_s": self.request_timeout_s, "steps": self.steps, "admitted": self.admitted,
                "finished": self.finished, "cancelled": self.cancelled, "timed_out": self.timed_out,
                "rejected_queue_full": self.rejected_full, "admission_max_wait_s": self.admission_max_wait_s,
                "drains": self.drains, "preempted": self.preempted, "drain_preempt_tokens": self.drain_preempt_tokens,
                "free_rows_waiting": self.free_rows_waiting,
                "thread_s": {k: round(v, 4) for k, v in dict(self.thread_time.seconds).items()}}

    # -- the scheduler thread ----------------------------------------------------

    def _run(self, setup: Callable[[], None]) -> None:
        try:
            setup()
        except BaseException as exc:
            self._setup_error = exc
            self._ready.set()
            return
        self._ready.set()
        progressed, failures = True, 0
        self.thread_time.mark("idle")  # setup is not serving time
        while True:
            idle = not self._running and not self._waiting
            if not self._take_inbox(wait=0.0 if progressed else (IDLE_WAIT_S if idle else 0.005)):
                break
            try:
                progressed = self._iterate(idle)
                failures = 0
            except Exception as exc:  # a bug here must not kill the thread (every ticket would wait forever)
                log.exception("scheduler iteration failed; serving on")
                progressed, failures = False, failures + 1
                if failures >= MAX_FAILED_ITERATIONS:  # nor retry forever: end every row with 500, start clean
                    self._fail_all(exc)
                    failures = 0
            self._outbox.flush()
            self.thread_time.mark("deliver")
        self._shutdown()
        self._outbox.flush()
        self.fetcher.stop()

    def _iterate(self, idle: bool) -> bool:
        """Registry changes and idle eviction (now and then), timeouts, admission, one step;
        True when a row started or a step ran."""
        now = self._clock()
        clock = self.thread_time
        if idle or now - self._synced_at >= SYNC_INTERVAL_S:
            self._synced_at = now
            self._guard(self._service.residency.evict_idle)  # registry changes, idle adapters (held ones stay)
        self._expire(now)
        clock.mark("sync")
        admitted = self._admit()
        clock.mark("admit")
        stepped = self._step() if self._running else False
        self._guard(self._gauges)  # metrics never stop serving
        clock.mark("gauges")
        return admitted or stepped

    def _take_inbox(self, wait: float) -> bool:
        """Apply what other threads sent; False when stopping. Waits up to `wait` s for something."""
        with self._lock:
            if not self._inbox and not self._stopping and wait > 0:
                self._lock.wait(wait)
                self.thread_time.mark("idle")
            if self._stopping:
                return False
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if isinstance(item, _Job):
                self._waiting.setdefault(item.tenant, deque()).append(item)
            elif isinstance(item, _Cancel):
                self._drop(item.ticket._job, item.error)
            else:
                self._run_call(item)
        self.thread_time.mark("inbox")
        return True

    @staticmethod
    def _run_call(call: _Call) -> None:
        try:
            call.result = call.fn()
        except BaseException as exc:
            call.error = exc
        call.done.set()

    def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:
            log.exception("scheduler: %s failed; serving on", getattr(fn, "__name__", fn))

    def _expire(self, now: float) -> None:
        late = [j for q in self._waiting.values() for j in q if j.deadline is not None and now >= j.deadline]
        late += [j for j in self._running.values() if j.deadline is not None and now >= j.deadline]
        for job in late:
            if job.done:  # another row of its group timed out first
                continue
            self._drop(job, RequestTimedOut(f"the request did not finish within request_timeout_s="
                                            f"{self.request_timeout_s:g} s"))
            self.timed_out += 1

    def _fail_all(self, error: BaseException) -> None:
        """Every running and waiting row ends with `error`'s status (500 for a bug), KV rows and holds freed."""
        for job in [*self._running.values(), *(j for q in self._waiting.values() for j in q)]:
            try:
                self._drop(job, error)
            except Exception:
                log.exception("ending a row after repeated failures failed")

    def _drop(self, job: _Job | None, error: BaseException) -> None:
        """End a waiting or running row early (cancel, timeout): KV row and hold freed, Finished(error);
        a fan-out row: its whole group."""
        if job is not None and job.group is not None and job.done:  # e.g. the ticket's row ended, others run
            job = next((m for m in job.group.jobs if not m.done), None)
        if job is None or job.done:
            return
        if job.row_id is not None:
            self.stepper.cancel(job.row_id)
            self._retire(job)
        else:
            q = self._waiting.get(job.tenant)
            if q is not None and job in q:
                q.remove(job)
                if not q:
                    del self._waiting[job.tenant]
        if isinstance(error, RequestCancelled):
            self.cancelled += 1
        self._fail(job, self._service.failed(error, job.plan.exchange.error))

    def _admit(self) -> bool:
        """Waiting rows into free KV rows, tenants taking turns; True when any row started."""
        started = False
        blocked: set[str] = set()  # tenants whose next row cannot start this iteration
        plan = self._slot_plan() if self.stepper.free_rows() > 0 else _SlotPlan()
        while self.stepper.free_rows() > 0:
            tenant = next((t for t in self._waiting if t not in blocked and not self._at_cap(t)), None)
            if tenant is None:
                break
            q = self._waiting[tenant]
            if not self._may_take_slot(q[0], plan):
                blocked.add(tenant)
                continue
            outcome = self._start(q[0])
            if outcome == "blocked":
                blocked.add(tenant)
                continue
            if outcome == "full":  # the stepper refused for lack of a KV row after all: next step
                break
            q.popleft()
            if not q:
                del self._waiting[tenant]
            else:
                self._waiting.move_to_end(tenant)  # its turn is over
            started = started or outcome == "started"
        return started

    def _slot_plan(self) -> _SlotPlan:
        """Where the free adapter slots go this iteration (see the module docstring): the adapters
        waiting heads need that are not resident, overdue ones first (oldest first), then by the
        waiting rows each would serve; as many as slots are not held. With none free and one
        overdue, a resident adapter drains (the same one until the overdue adapter is resident):
        the one the fewest waiting rows need (their rows would wait), then the one whose running
        rows have the fewest tokens left to generate at most (its slot frees soonest)."""
        residency = self._service.residency
        resident, held = residency.resident_ids(), residency.held_ids()
        now, bound = self._clock(), self.admission_max_wait_s
        rows: Counter[str] = Counter()
        oldest: dict[str, float] = {}
        heads: set[str] = set()
        for q in self._waiting.values():
            for i, job in enumerate(q):
                since = job.waiting_since if job.waiting_since is not None else job.arrived
                for adapter in _adapters(job):
                    rows[adapter] += 1
                    oldest[adapter] = min(oldest.get(adapter, since), since)
                    if i == 0:
                        heads.add(adapter)
        overdue = lambda a: bound > 0 and now - oldest[a] >= bound  # noqa: E731
        ranked = sorted((a for a in heads if a not in resident),
                        key=lambda a: (not overdue(a), oldest[a] if overdue(a) else -rows[a], oldest[a]))
        free = max(residency.max_resident - len(held), 0)
        if self._draining is not None and (self._drain_for in resident or self._drain_for not in rows):
            # the overdue adapter has its slot (or nobody waits for it any more); until then the drained
            # one stays closed even once unheld, or its rows would take the slot back while the overdue
            # adapter's store read runs
            self._draining = self._drain_for = None
        if not free and ranked and overdue(ranked[0]) and self._draining is None and held:
            left: Counter[str] = Counter()  # adapter -> most tokens one of its running rows may still generate
            for job in self._running.values():
                if job.adapter is not None:
                    left[job.adapter] = max(left[job.adapter], job.params.max_new_tokens - len(job.stream.token_ids))
            self._draining, self._drain_for = min(held, key=lambda a: (rows[a], left[a])), ranked[0]
            self.drains += 1
            log.info("admission: draining %s for %s (waiting %.1f s)", self._draining, ranked[0], now - oldest[ranked[0]])
            self._preempt(self._draining, now)
        return _SlotPlan(frozenset(ranked[:free]), self._draining)

    def _preempt(self, adapter: str, now: float) -> None:
        """The drained adapter's preemptible rows with more than `drain_preempt_tokens` tokens still
        to go leave the stepper (KV row and hold freed) and go back to the front of their tenant's
        queue, so the slot frees within about that many steps instead of after the longest row.
        A preempted row resumes with its prompt and the tokens it has produced as the new prompt
        (prefilled again) and the rest of its budget; its stream carries on. Its wait for a slot
        counts from now, so it cannot at once drain another adapter in turn."""
        limit = self.drain_preempt_tokens
        if limit <= 0:
            return
        for job in [j for j in self._running.values() if j.adapter == adapter]:
            if not job.preemptible or job.params.max_new_tokens - len(job.stream.token_ids) <= limit:
                continue
            self.stepper.cancel(job.row_id)
            self._retire(job)
            job.row_id, job.waiting_since = None, now
            job.preempted += 1
            self.preempted += 1
            self._waiting.setdefault(job.tenant, deque()).appendleft(job)

    def _may_take_slot(self, job: _Job, plan: _SlotPlan) -> bool:
        """`job`'s adapters (a fan-out's: every row's) are resident and not draining, or are among
        the plan's loads."""
        resident = self._service.residency.resident_ids()
        return all(a != plan.draining and (a in resident or a in plan.loads) for a in _adapters(job))

    def _wanted(self) -> set[str]:
        """Adapters of the rows waiting to run (the residency asks while it picks an LRU victim)."""
        return {a for q in self._waiting.values() for j in q for a in _adapters(j)}

    def _at_cap(self, tenant: str) -> bool:
        return 0 < self.tenant_max_running <= self._running_by_tenant[tenant]

    def _start(self, job: _Job) -> str:
        """'started', 'blocked' (every adapter slot held: wait), 'full' (no KV row after all) or
        'failed' (the request got its error reply)."""
        if job.group is not None:
            return self._start_group(job.group)
        service = self._service
        try:
            if job.preempted:  # its own adapter again, or its load error: never another model mid-reply
                plan = job.plan
                adapter = service.residency.hold(plan.record) if plan.record is not None else None
            else:
                plan, adapter = service.adapter_for(job.plan, service.residency.hold)
        except AdapterNotReady:  # every slot held, or its store read still running: wait
            return "blocked"
        except Exception as exc:  # AdapterLoadFailed under load_failure_policy: error, or a bug
            self._finish(job, service.failed(exc, job.plan.exchange.error))
            return "failed"
        job.plan, job.adapter = plan, adapter
        row_id = next(self._row_ids)
        if job.preempted:  # where it was: its tokens so far are part of the prompt now
            done = list(job.stream.token_ids)
            row = GenerationRow(list(plan.input_ids) + done, adapter,
                                replace(job.params, max_new_tokens=job.params.max_new_tokens - len(done)))
        else:
            row = GenerationRow(plan.input_ids, adapter, job.params)
        try:
            self.stepper.add(row_id, row)
        except CacheFull:
            self._release(job)
            return "full"
        except Exception as exc:  # RowTooLong (submit checks it first), bad params: this row only
            self._release(job)
            if isinstance(exc, RowTooLong):
                exc = RequestTooLarge(str(exc))
            self._finish(job, service.failed(exc, job.plan.exchange.error))
            return "failed"
        job.row_id = row_id
        self._running[row_id] = job
        self._running_by_tenant[job.tenant] += 1
        self.admitted += 1
        return "started"

    def _start_group(self, group: _Group) -> str:
        """`_start` for a fan-out request: every row or none. 'full' while fewer KV rows are free than
        it has rows (it keeps its tenant's turn, so smaller requests cannot starve it); 'blocked' while
        its rows would take its tenant past `tenant_max_running` (a group wider than the cap runs
        when none of the tenant's rows do)."""
        service, jobs = self._service, group.jobs
        if self.stepper.free_rows() < len(jobs):
            return "full"
        running = self._running_by_tenant[jobs[0].tenant]
        if self.tenant_max_running and running and running + len(jobs) > self.tenant_max_running:
            return "blocked"
        taken: list[_Job] = []
        try:
            for job in jobs:  # hold every row's adapter first
                job.plan, job.adapter = service.adapter_for(job.plan, service.residency.hold)
                taken.append(job)
            for job in jobs:
                row_id = next(self._row_ids)
                self.stepper.add(row_id, GenerationRow(job.plan.input_ids, job.adapter, job.params))
                job.row_id = row_id
        except (AdapterNotReady, CacheFull) as exc:
            self._undo(jobs, taken)
            return "blocked" if isinstance(exc, AdapterNotReady) else "full"
        except Exception as exc:  # a load failure under load_failure_policy: error, bad params: this request only
            self._undo(jobs, taken)
            if isinstance(exc, RowTooLong):
                exc = RequestTooLarge(str(exc))
            self._fail(jobs[0], service.failed(exc, group.plan.exchange.error))
            return "failed"
        for job in jobs:
            self._running[job.row_id] = job
            self._running_by_tenant[job.tenant] += 1
        self.admitted += 1
        return "started"

    def _undo(self, jobs: list[_Job], taken: list[_Job]) -> None:
        """A group's admission failed part way: its added rows leave the stepper, its holds go."""
        for job in jobs:
            if job.row_id is not None:
                row_id, job.row_id = job.row_id, None
                self._guard(lambda: self.stepper.cancel(row_id))
        for job in taken:
            self._release(job)

    def _step(self) -> bool:
        """One step in its two halves (`RowStepper.prefill_phase`, `decode_phase`). The first tokens of
        rows whose prompt completed are handed out, and sent to their event loops, before the decode
        forward runs: a new row's first token does not wait for the running rows' next ones."""
        clock = self.thread_time
        if self._waiting:  # after admission: KV rows nobody could take (adapter slots, fairness caps)
            self.free_rows_waiting += self.stepper.free_rows()
        try:
            events = self.stepper.prefill_phase()
        except Exception as exc:
            self._engine_failed(exc)
            return False
        clock.mark("prefill")
        if events:
            self._hand_out(events)
            self._outbox.flush()
        clock.mark("first_tokens")
        try:
            events = self.stepper.decode_phase()
        except Exception as exc:
            self._engine_failed(exc)
            return False
        clock.mark("decode")
        self.steps += 1
        self._hand_out(events)
        clock.mark("tokens")
        return True

    def _engine_failed(self, exc: Exception) -> None:
        """The engine failed as a whole: every running row gets 500, the worker lives."""
        log.exception("the stepper failed with %d rows running", len(self._running))
        for job in list(self._running.values()):
            if job.done:  # a row of a group already ended by another of its rows
                continue
            self._guard(lambda: self.stepper.cancel(job.row_id))
            self._retire(job)
            self._fail(job, self._service.failed(exc, job.plan.exchange.error))

    def _hand_out(self, events: list[RowEvent]) -> None:
        now = self._clock()
        for event in events:
            job = self._running.get(event.row_id)
            if job is None:
                continue
            try:
                self._on_event(job, event, now)
            except Exception as exc:  # a bug handing out this row's token: this row gets 500, not the others
                log.exception("handing out a token failed; its row ends with 500")
                self._drop(job, exc)

    def _on_event(self, job: _Job, event: RowEvent, now: float) -> None:
        if event.token_id is not None:
            if job.first_token_at is None:
                job.first_token_at = now
            job.last_token_at = now
            if job.params.logprobs:
                job.logprobs.append(float(event.logprob))
                job.top_logprobs.append(tuple(event.top_logprobs or ()))
            piece = job.stream.push(event.token_id)
            if piece is not None and job.group is None and not self._emit(job, piece):  # fan-out rows stream nothing
                self._drop(job, RequestCancelled("cancelled: nobody reads the reply"))
                return
        if event.finished is None and not job.stream.stopped:
            return
        if event.finished is None:  # a stop string ended it: free its KV row now
            self.stepper.cancel(job.row_id)
        self._retire(job)
        self._complete(job, event.finished or "stop")

    def _complete(self, job: _Job, finish_reason: str) -> None:
        """The reply the static path would build from the same tokens, and the text it has that
        the deltas did not carry yet."""
        service = self._service
        ids = list(job.stream.token_ids)
        asked = bool(job.params.logprobs)
        out = GenerationOutput(ids, finish_reason, job.logprobs if asked else None,
                               job.top_logprobs if asked else None)
        try:
            answer = service.answer(job.plan, out)
        except Exception as exc:
            log.exception("building the reply failed")
            self._fail(job, service.failed(exc, job.plan.exchange.error))
            return
        rest = job.stream.rest(answer.text, answer.tokens) if job.group is None else None
        if rest is not None:
            self._emit(job, rest)
        itl = ((job.last_token_at - job.first_token_at) / (len(ids) - 1)) if len(ids) > 1 else None
        ttft = (job.first_token_at if job.first_token_at is not None else self._clock()) - job.arrived
        service.record_streamed(job.plan, answer.tokens, ttft, itl)
        if job.group is None:
            self._finish(job, answer.reply)
            return
        group = job.group  # a fan-out row: the request finishes with its last row
        job.done = True
        group.results[job.index] = fanout.RowResult(job.plan, out, answer)
        if len(group.results) == len(group.jobs) and not group.finished:
            group.finished = True
            try:
                reply = fanout.merge(group.plan, [group.results[i] for i in range(len(group.jobs))])
            except Exception as exc:
                log.exception("merging a fan-out's rows failed")
                reply = service.failed(exc, group.plan.exchange.error)
            self._finish(group.jobs[0], reply)

    def _emit(self, job: _Job, piece: Piece) -> bool:
        ids = tuple(job.stream.token_ids[piece.start:piece.end])
        lps = None
        if job.plan.request.logprobs and job.params.logprobs:
            lps = logprobs_body(self._service.token_text, ids, job.logprobs[piece.start:piece.end],
                                job.top_logprobs[piece.start:piece.end])
        return job.ticket._put(TextDelta(piece.text, ids, lps))

    def _retire(self, job: _Job) -> None:
        """A running row left the stepper: forget it, release its adapter."""
        self._running.pop(job.row_id, None)
        self._running_by_tenant[job.tenant] -= 1
        if self._running_by_tenant[job.tenant] <= 0:
            del self._running_by_tenant[job.tenant]
        self._release(job)

    def _release(self, job: _Job) -> None:
        if job.adapter is not None:
            adapter, job.adapter = job.adapter, None
            self._guard(lambda: self._service.residency.release(adapter))

    def _fail(self, job: _Job, reply: "Reply") -> None:
        """A row ended with an error reply: a one-row request's reply; a fan-out row's ends every other
        row of its group (KV rows and holds freed) and is the request's one reply."""
        group = job.group
        if group is None:
            self._finish(job, reply)
            return
        job.done = True
        for other in group.jobs:
            if other.done:
                continue
            other.done = True
            if other.row_id is not None and other.row_id in self._running:
                self._guard(lambda: self.stepper.cancel(other.row_id))
                self._retire(other)
        if not group.finished:
            group.finished = True
            self._finish(group.jobs[0], reply)

    def _finish(self, job: _Job, reply: "Reply") -> None:
        job.done = True
        self.finished += 1
        with self._lock:
            self._in_flight -= 1
        job.ticket._put(Finished(reply))

    def _gauges(self) -> None:
        self.running_rows = len(self._running)
        self.waiting_rows = sum(len(q) for q in self._waiting.values())
        # The LoRA gauge's "running" adapters are the ones loaded and ready to serve (the inference
        # extension's model-server protocol: ActiveAdapters), as the static path reports them between
        # batches; every running row's adapter is among them. "waiting": tenants of waiting rows.
        residency = self._service.residency
        resident = residency.resident_ids()
        running = sorted({a.split("@")[0] for a in resident})
        waiting = [t for t, q in self._waiting.items() if t != BASE_ROWS and q]
        metrics = self._service.metrics
        if metrics.scheduler_step(self.running_rows, self.waiting_rows, self.stepper.kv_utilisation(), running, waiting):
            metrics.tiers(len(resident), len(residency.host_tier))

    def _shutdown(self) -> None:
        """Stopping: every running and waiting request gets 503; pending calls still run."""
        error = WorkerStopping("the worker is stopping; retry on another")
        for job in [*self._running.values(), *(j for q in self._waiting.values() for j in q)]:
            self._drop(job, error)
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if isinstance(item, _Job):
                self._finish(item, self._service.failed(error, item.plan.exchange.error))
            elif isinstance(item, _Call):
                self._run_call(item)


def _adapters(job: _Job) -> Iterator[str]:
    """The adapters a waiting request's rows were planned with (a fan-out: each row's; base rows none)."""
    for member in (job.group.jobs if job.group is not None else (job,)):
        if member.plan.record is not None:
            yield member.plan.record.adapter_id
