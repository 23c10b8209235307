"""The request path of one worker, top to bottom, free of TorchServe.

    raw requests ─► parse_request ─► plan (tenant → record | base + reason; a fallback chain or
                    compare mode: several rows of one batch, handler/fanout.py)
                 ─► tokenize (prompt limit) ─► residency (load / hold / evict)
                 ─► static: engine.generate (one call for the whole batch)
                    continuous: scheduler.py (rows join and leave between steps)
                 ─► decode, stop strings ─► replies (200 or the request's own 4xx/5xx)

Why no TorchServe here: the service can sit behind another server later, and
tests drive it directly. `ts_entry.py` is the only TorchServe-aware module.

Two schedulers (`scheduler` config; `scheduler_kind` is the effective one):
- static: `handle_batch` serves a batch to completion on the caller's thread.
- continuous: `submit` plans and tokenizes on the caller's thread (the same checks
  in the same order), then hands the request to the scheduler thread, which alone
  runs the engine and the residency; `handle_batch` submits each request and waits.
Both build every reply with `answer`, so a request gets the same body either way.

Concurrency: static: `handle_batch` and `describe` run on the worker's request
thread, one call at a time (TorchServe serialises `handle`). Continuous: `submit`,
`handle_batch`, `describe` and `stop` may be called from any thread; only the
scheduler thread touches the engine and the residency (`describe` runs its
engine part there, between steps). `_plan`/`_tokenize` read the tenant cache,
which is locked (tenants.py), and the tokenizer. The registry subscriber thread
only touches the tenant cache and the residency's change inbox.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from loraplex_common.config import LoraplexConfig
from tenant_registry.registry import TenantRegistry
from tenant_registry.schema import TenantRecord
from tenant_registry.store import AdapterStore, open_store

from .engine import EngineSettings, make_engine
from .engine.api import Engine, GenerationOutput, GenerationRow, SamplingParams, StepLimits
from .engine.errors import EngineError
from .errors import (
    AdapterLoadFailed,
    AdapterNotAllowed,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    RequestTooLarge,
    TenantRequired,
    TenantUnauthorized,
    error_body,
    http_status,
)
from tenant_registry.errors import InvalidTenantId, TaskNotFound, TenantDisabled, TenantNotFound
from tenant_registry.ids import DEFAULT_TASK, adapter_id, parse_task_adapter_id
from tenant_registry.keys import verify_key
from .model_loading import eos_token_ids, load_base_model
from .prompts import encode_messages
from .openai_api import models_body
from .request import BASE, InferenceRequest
from .host_tier import HostTier
from .metrics import WorkerMetrics
from .residency import AdapterResidency
from .scheduler import Finished, Scheduler, Ticket
from .task_router import RouteDecision, make_routing, routing_text
from . import fanout
from .fanout import Fanout, FanoutPlanner, RowResult
from .routes import Exchange, JsonExchange, route_for
from .text_stream import covering, logprobs_body, stop_cut
from .tenants import TenantResolver
from .tokenizing import serial
from .ab_split import PINNED, SplitChooser

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class RawRequest:
    body: Any
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Reply:
    status: int
    phrase: str
    body: dict
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. Retry-After of a 503 QueueFull

    @classmethod
    def error(cls, exc: BaseException) -> "Reply":
        code, phrase = http_status(exc)
        return cls(code, phrase, error_body(exc))


@dataclass(frozen=True)
class Answer:
    """A served row: its reply, the reply's text and completion tokens (after a stop-string cut)."""

    reply: Reply
    text: str
    tokens: int


@dataclass(frozen=True)
class Plan:
    """How one parsed request will be served."""

    request: InferenceRequest
    record: TenantRecord | None  # None = base model
    fallback: str | None  # why a tenant request runs on the base model, if it does
    input_ids: tuple[int, ...] = ()
    exchange: Exchange | None = None  # the API it came by (routes.py): writes its reply and errors
    version_by: str | None = None  # why this version of the task serves it: ab_split.PINNED/SPLIT/SPLIT_MISSING/CURRENT
    route: RouteDecision | None = None  # which task and why (handler/task_router.py); None: no tenant task
    fanout: Fanout | None = None  # a chain / compare request's rows (handler/fanout.py); None = one row


class LoraplexService:
    def __init__(self, config: LoraplexConfig, tokenizer: Any, engine: Engine, registry: TenantRegistry,
                 store: AdapterStore) -> None:
        self.config = config
        self.tokenizer = tokenizer = serial(tokenizer)  # request threads encode concurrently (tokenizing.py)
        self.engine = engine
        self.registry = registry
        self.store = store
        self.resolver = TenantResolver(registry, refresh_s=config.registry_cache_s,
                                       stale_s=config.registry_stale_s)
        self.splits = SplitChooser()  # step 3 of the planning (pinned > A/B split > current) and its counters
        # Prometheus metrics (handler/metrics.py): ts_entry adds the sinks; recorded on the engine-owning thread
        self.metrics = WorkerMetrics(max_adapters=config.metrics_max_adapters, max_lora=config.resident_adapters)
        self._batch_started = time.perf_counter()
        on_cuda = str(engine.get_model_status().get("device", "cpu")).startswith("cuda")
        self.residency = AdapterResidency(
            engine, read=store.read,
            max_resident=config.resident_adapters, idle_ttl_s=config.idle_ttl_s,
            negative_cache_s=config.negative_cache_s,
            host_tier=HostTier(config.host_tier_mb << 20, pin=on_cuda),
            fetch_pinned=lambda: registry.current_records(registry.pinned()),
            max_pinned=config.max_pinned_adapters, record_uses=registry.add_uses, metrics=self.metrics)
        self.fallbacks: dict[str, int] = {}
        self.requests = 0
        self.batches = 0  # engine calls; fewer than requests when TorchServe batches
        self._stop = threading.Event()
        self._subscriber: threading.Thread | None = None
        self._count_lock = threading.Lock()
        self.hold_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.scheduler: Scheduler | None = None
        if config.scheduler == "continuous":
            limits = StepLimits(max_rows=config.kv_rows, max_len=config.kv_row_tokens,
                                prefill_chunk=config.prefill_chunk, graph_batch_sizes=config.graph_batch_sizes,
                                prefill_wait_steps=config.prefill_wait_steps, prefill_graphs=config.prefill_graphs,
                                overlap={"auto": None, "on": True, "off": False}[config.step_overlap],
                                mixed={"auto": None, "on": True, "off": False}[config.step_mixed],
                                mixed_tokens=config.mixed_prefill_tokens)
            try:
                stepper = engine.stepper(limits)
            except EngineError as exc:
                log.warning("scheduler: continuous asked for, serving static batches instead: %s", exc)
            else:
                self.scheduler = Scheduler(self, stepper, max_waiting=config.max_waiting,
                                           retry_after_s=config.retry_after_s,
                                           tenant_max_running=config.tenant_max_running,
                                           request_timeout_s=config.request_timeout_s)
        log.info("scheduler: %s", self.scheduler_kind)
        self.router = make_routing(config.task_router, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                                   lambda batch: self._on_engine(lambda: self.engine.embed(batch)))
        self.fanout = FanoutPlanner(self.resolver, lambda t, k: registry.history(t, task=k),
                                    max_rows=config.max_fanout_rows, max_adapters=config.resident_adapters,
                                    max_running=config.kv_rows if self.scheduler is not None else None)

    @property
    def scheduler_kind(self) -> str:
        """The effective scheduler: "continuous", or "static" (asked for, or the engine has no stepper)."""
        return "continuous" if self.scheduler is not None else "static"

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: LoraplexConfig) -> "LoraplexService":
        """Build everything a worker needs, once (TorchServe's `initialize`)."""
        base_dir = Path(config.base_model_dir or model_dir)
        model, tokenizer = load_base_model(base_dir, device=config.device, dtype=config.dtype)
        return cls.from_model(config, model, tokenizer, eos_token_ids=eos_token_ids(model, tokenizer),
                              pad_token_id=int(tokenizer.pad_token_id))

    @classmethod
    def from_model(cls, config: LoraplexConfig, model: Any, tokenizer: Any, *, eos_token_ids: Sequence[int],
                   pad_token_id: int) -> "LoraplexService":
        """The engine, registry and store for an already loaded base model, started: the subscriber,
        then warmup and prefetch (on the scheduler thread when continuous, which owns the engine);
        returns once both are done. `from_model_dir` and the in-process serving bench use it."""
        engine = make_engine(config.engine, model, engine_settings(config), eos_token_ids=eos_token_ids,
                             pad_token_id=pad_token_id)
        registry = TenantRegistry(config.redis_url, config.redis_prefix)
        store = open_store(config.adapter_store, config.adapter_store_endpoint)
        service = cls(config, tokenizer, engine, registry, store)
        service.start()
        if service.scheduler is not None:
            service.scheduler.start(setup=lambda: (service.scheduler.stepper.warmup(), service.prefetch()))
        else:
            service.prefetch()
        return service

    def start(self) -> None:
        """Follow registry change events on a daemon thread (reconnects by itself)."""
        self._subscriber = self.registry.subscribe(self._on_registry_event, self._stop)

    def _on_registry_event(self, event: dict) -> None:
        """Subscriber thread: the tenant cache and the residency's inbox (applied on the engine-owning thread)."""
        self.residency.changes.on_event(event)  # first: `resolver.events_seen` then counts it as seen by both
        self.resolver.on_event(event)

    def prefetch(self) -> list[str]:
        """Before the first request: the pinned tenants' adapters, then `prefetch_tenants`' and the
        `prefetch_top_n` most used tenants' current adapters, into the free slots and the host tier.
        Never fatal: an unknown or disabled tenant is skipped, a failed load is quarantined, an
        unreachable registry is logged (the worker starts and serves as usual)."""
        self.residency.sync()  # the pinned set, loaded
        try:
            top = self.registry.most_used(self.config.prefetch_top_n)
        except Exception as exc:
            log.warning("prefetch: could not read the most used tenants: %s: %s", type(exc).__name__, exc)
            top = []
        records = []
        for tenant in dict.fromkeys([*self.config.prefetch_tenants, *top]):
            try:
                record = self.resolver.resolve(tenant)
            except Exception as exc:
                log.warning("prefetch: tenant %r skipped: %s: %s", tenant, type(exc).__name__, exc)
                continue
            if record is None:
                log.warning("prefetch: tenant %r is not registered; skipped", tenant)
            elif record.enabled:
                records.append(record)
        return [*self.residency.pinned_ids(), *self.residency.prefetch(records)]

    def stop(self) -> None:
        """Stop following the registry and, in continuous mode, the scheduler thread (requests still
        in it get 503)."""
        self._stop.set()
        if self.scheduler is not None:
            self.scheduler.stop()

    # -- the request path ----------------------------------------------------------

    def submit(self, raw: RawRequest, loop: asyncio.AbstractEventLoop | None = None) -> Reply | Ticket:
        """Continuous mode, any thread: the request's checks on this thread, then a Ticket whose events
        (`scheduler.TextDelta`s, one `scheduler.Finished`) come from the scheduler thread; with `loop`,
        delivered through it (`await ticket.next()`). An immediate Reply for every error, the model
        list, 413 (can never fit in a KV row) and 503 (queue full, with Retry-After)."""
        if self.scheduler is None:
            raise RuntimeError("submit needs scheduler: continuous; this worker serves static batches (handle_batch)")
        with self._count_lock:
            self.requests += 1
        route = route_for(raw.headers)
        try:
            prepared = self._prepare(route, raw)
            if isinstance(prepared, Reply):
                return prepared
            self._check_fits(prepared)
            return self.scheduler.submit(prepared, loop)
        except Exception as exc:
            return self.failed(exc, route.error)

    def handle_batch(self, batch: Sequence[RawRequest]) -> list[Reply]:
        """One reply per request. Continuous: each request submitted, then waited for."""
        if self.scheduler is not None:
            return [_wait(r) if isinstance(r, Ticket) else r for r in [self.submit(raw) for raw in batch]]
        self.requests += len(batch)
        self._batch_started = time.perf_counter()
        replies: list[Reply | None] = [None] * len(batch)
        plans: dict[int, Plan] = {}
        for i, raw in enumerate(batch):
            route = route_for(raw.headers)
            try:
                prepared = self._prepare(route, raw)
            except Exception as exc:
                replies[i] = self.failed(exc, route.error)
                continue
            if isinstance(prepared, Reply):
                replies[i] = prepared
            else:
                plans[i] = prepared
        self.residency.evict_idle()
        pending = dict(plans)
        while pending:
            wave = self._next_wave(pending)
            for i in wave:
                del pending[i]
            self.metrics.wave(len(wave), len(pending), _tenants(plans, wave), _tenants(plans, pending))
            self._serve_wave({i: plans[i] for i in wave}, replies)
        if plans:  # between batches: nothing runs; "running" adapters = the resident ones, ready to serve
            self.metrics.wave(0, 0, sorted({a.split("@")[0] for a in self.residency.resident_ids()}), [])
            self.metrics.tiers(len(self.residency.resident_ids()), len(self.residency.host_tier))
        return [r if r is not None else Reply.error(RuntimeError("request was not served")) for r in replies]

    def _prepare(self, route, raw: RawRequest) -> "Plan | Reply":
        """Parse, plan and tokenize one request (both schedulers); the model list is answered here."""
        exchange = route.parse(raw.body, raw.headers)
        plan = replace(self._plan(exchange.request), exchange=exchange)
        if route.lists_models:  # the same checks as a completion, then the list
            tenant = plan.record.tenant_id if plan.record is not None else None
            listed = models_body(tenant, self.resolver.tasks(tenant) if tenant is not None else ())
            return Reply(200, "OK", exchange.reply(listed))
        return self._tokenize(self.fanout.plan(plan))  # step 4: one row, or a chain / compare fan-out

    def _check_fits(self, plan: Plan) -> None:
        """Continuous: 413 for a request that can never fit in one KV row (waiting would not help)."""
        prompt, new, room = len(plan.input_ids), self.sampling(plan.request).max_new_tokens, self.config.kv_row_tokens
        if prompt + new > room:
            raise RequestTooLarge(f"prompt of {prompt} tokens + max_new_tokens {new} = {prompt + new} tokens; "
                                  f"one request may hold at most {room} (kv_max_len)")

    def _next_wave(self, pending: dict[int, Plan]) -> list[int]:
        """Rows that fit in the resident set together: all base rows and rows of at most
        `config.resident_adapters` distinct adapters, resident ones first (no load needed).
        A batch needing more adapters than that is served in several waves, each one
        engine call, rather than falling back to the base model."""
        resident = self.residency.resident_ids()
        needs = {i: fanout.adapters(p) for i, p in pending.items()}  # a fan-out's rows go in one wave
        chosen: set[str] = set()
        wave: set[int] = set()
        for i in sorted(pending, key=lambda i: not needs[i] <= resident):  # stable: arrival order in each group
            if len(chosen | needs[i]) <= self.residency.max_resident:
                chosen |= needs[i]
                wave.add(i)
        return [i for i in pending if i in wave] or list(pending)[:1]

    def _serve_wave(self, plans: dict[int, Plan], replies: list) -> None:
        """One engine call for these rows; adapters pinned for its duration."""
        with self.residency.batch() as lease:
            rows: dict[tuple[int, int], GenerationRow] = {}  # (request, its row): a fan-out has several
            row_plans: dict[tuple[int, int], Plan] = {}
            for i, plan in plans.items():
                try:
                    served = [self.adapter_for(p, lease.acquire) for p in fanout.row_plans(plan)]
                except AdapterLoadFailed as exc:
                    replies[i] = self.failed(exc, plan.exchange.error)
                    continue
                for j, (row_plan, adapter) in enumerate(served):
                    row_plans[i, j] = row_plan
                    rows[i, j] = GenerationRow(row_plan.input_ids, adapter,
                                               fanout.row_sampling(plan, self.sampling(row_plan.request)))
            if not rows:
                return
            order = list(rows)
            started = time.perf_counter()
            try:
                outputs = self.engine.generate([rows[i] for i in order])
            except Exception as exc:  # the engine failed as a whole: these rows get 500, the worker lives
                log.exception("engine.generate failed for a batch of %d rows", len(order))
                for i, _ in order:
                    replies[i] = self.failed(exc, plans[i].exchange.error)
                return
            self.batches += 1
            engine_s = time.perf_counter() - started
            results: dict[int, list[RowResult]] = {}
            for key, out in zip(order, outputs):
                answer = self.answer(row_plans[key], out)
                results.setdefault(key[0], []).append(RowResult(row_plans[key], out, answer))
                self._record_served(row_plans[key], answer.tokens, engine_s)
            for i, served_rows in results.items():
                replies[i] = fanout.merge(plans[i], served_rows)

    def adapter_for(self, plan: Plan, acquire: Callable[[TenantRecord], str]) -> tuple[Plan, str | None]:
        """The engine adapter of a planned row, made resident by `acquire` (a hold); None = base.
        A failed load: AdapterLoadFailed under `load_failure_policy: error`, else the row runs on the
        base model, flagged `adapter_load_failed: <id>` (both schedulers)."""
        if plan.record is None:
            return plan, None
        try:
            return plan, acquire(plan.record)
        except AdapterLoadFailed as exc:
            if self.config.load_failure_policy != "base":
                raise
            return replace(plan, record=None, fallback=f"adapter_load_failed: {exc.adapter_id}"), None

    def record_streamed(self, plan: Plan, tokens: int, ttft_s: float, itl_s: float | None) -> None:
        """Continuous (scheduler thread): per-adapter request, token and latency metrics of one row:
        arrival to first token, and the mean time between its tokens."""
        record = plan.record
        self.metrics.streamed(_metric_tenant(plan), record.version if record is not None else None, tokens,
                              ttft_s, itl_s, task=_metric_task(plan))

    def _record_served(self, plan: Plan, tokens: int, engine_s: float) -> None:
        """Static: per-adapter request, token and latency metrics of one answered row. Nothing reaches
        the client before the whole reply, so its time to first token is the time from the batch
        reaching the worker to that reply."""
        record = plan.record
        self.metrics.served(_metric_tenant(plan), record.version if record is not None else None, tokens,
                            engine_s, time.perf_counter() - self._batch_started, task=_metric_task(plan))

    def _plan(self, req: InferenceRequest) -> Plan:
        """Who may be served, then with what. Every request that names a tenant passes the same
        checks in the same order, whatever it asks for (a task, `adapter: base`, a pin, sampling,
        chat): its key (401), the tenant's existence under the unknown-tenant policy (404), its
        status (403, all its tasks); only then are the task (`_task_record`) and the `adapter`
        field (current, pinned or base) chosen."""
        cap = self.config.max_new_tokens_cap
        if req.max_new_tokens is not None and req.max_new_tokens > cap:
            raise InvalidRequest(f"'max_new_tokens' is {req.max_new_tokens}; this server allows at most {cap}")
        if req.tenant is None:
            if self.config.require_tenant:
                raise TenantRequired("name a tenant with the X-Tenant-ID header or the 'tenant' field")
            return Plan(req, None, "no_tenant")
        if self.config.require_tenant_key:
            self._authenticate(req)
        pin = self._own_pin(req)
        task = pin[0] if pin is not None else (req.task or DEFAULT_TASK)
        record = self.resolver.resolve(req.tenant, task)
        known = record if record is not None else self._any_task_record(req.tenant)
        if known is None:
            if self.config.unknown_tenant_policy == "reject":
                raise TenantNotFound(req.tenant)
            if req.adapter not in (None, BASE):
                self._pinned_version(req)  # 403 if it names another tenant's adapter
                raise TenantNotFound(req.tenant)  # a pin of an unknown tenant names nothing that exists
            return Plan(req, None, "unknown_tenant")
        if known.status != "enabled":
            raise TenantDisabled(req.tenant)
        if req.adapter == BASE:
            return Plan(req, None, None)
        if req.adapter is not None:
            task, version = self._pinned_version(req)  # 403 unless one of the tenant's own
            if record is None:
                raise TaskNotFound(req.tenant, task)  # a pin names a version of a task that must exist
            return Plan(req, self._explicit_version(record, version), None, version_by=PINNED,
                        route=self.router.explicit(task))
        if self.fanout.chained(req):  # step 4 serves it: the chain's links name their tasks (no routing, no split)
            return Plan(req, known, None)
        route = self._route(req)  # step 2: the task (explicit > router > default)
        if route.task != task:
            task, record = route.task, self.resolver.resolve(req.tenant, route.task)
        plan = self._split_version(req, record if record is not None else self._task_record(req, task))
        if plan.record.task != route.task:  # the task named is missing: unknown_task_policy "default" served it
            route = self.router.default()
        return replace(plan, route=route)

    def _route(self, req: InferenceRequest) -> RouteDecision:
        """The task of a known, enabled tenant's request: the one it named, else its policy's router's
        pick (`router: classify`, handler/task_router.py; never raises), else the default task."""
        if req.task is not None:
            return self.router.explicit(req.task)
        policy = self.resolver.policy(req.tenant)
        return self.router.decide(req.tenant, routing_text(req.prompt, req.messages), policy.router,
                                  policy.examples, self.resolver.tasks(req.tenant))

    def _on_engine(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on the thread that owns the engine: the scheduler's (continuous; between two steps),
        else the caller's (static: the worker thread serving the batch)."""
        return fn() if self.scheduler is None else self.scheduler.call(fn)

    def _split_version(self, req: InferenceRequest, current: TenantRecord) -> Plan:
        """A request that pinned no version: the version its task's A/B split picks (handler/ab_split.py;
        sticky by X-User-ID), looked up and served exactly like a pinned one, else the current one."""
        choice = self.splits.choose(self.resolver.policy(current.tenant_id), current, req.user_id,
                                    lambda version: self._history_version(current, version))
        return Plan(req, choice.record, None, version_by=choice.by)

    def _task_record(self, req: InferenceRequest, task: str) -> TenantRecord:
        """The selection rule for a task the (known, enabled) tenant does not have, the tenant's own
        (`TenantPolicy.unknown_task`, `tenantctl router --unknown-task`) or else the worker's
        `unknown_task_policy`: under "default" its default task serves the request; under "reject"
        (and when it has no default task either) 404 naming the task."""
        rule = self.resolver.policy(req.tenant).unknown_task or self.config.unknown_task_policy
        if rule == "default" and task != DEFAULT_TASK:
            record = self.resolver.resolve(req.tenant, DEFAULT_TASK)
            if record is not None:
                return record
        raise TaskNotFound(req.tenant, task)

    def _any_task_record(self, tenant: str) -> TenantRecord | None:
        """A current record of any of the tenant's tasks (its status is the tenant's), or None when
        the tenant is not registered."""
        for task in self.resolver.tasks(tenant):
            record = self.resolver.resolve(tenant, task)
            if record is not None:
                return record
        return None

    def _authenticate(self, req: InferenceRequest) -> None:
        """401 unless X-Tenant-Key matches the tenant's salted digest. Unknown tenants get the same
        answer as a wrong key, so the status does not reveal which tenants exist."""
        digest = self.resolver.key_digest(req.tenant)
        if req.key is None or digest is None or not verify_key(digest, req.key):
            raise TenantUnauthorized(f"tenant {req.tenant!r}: X-Tenant-Key is missing or wrong")

    @staticmethod
    def _own_pin(req: InferenceRequest) -> tuple[str, int] | None:
        """(task, N) of `"adapter": "<own tenant>[:<task>]@v<N>"`, else None (refused later by
        `_pinned_version`, after the tenant's checks)."""
        if req.adapter in (None, BASE):
            return None
        try:
            tenant, task, version = parse_task_adapter_id(req.adapter)
        except InvalidTenantId:
            return None
        return (task, version) if tenant == req.tenant else None

    @classmethod
    def _pinned_version(cls, req: InferenceRequest) -> tuple[str, int]:
        """(task, N) of `"adapter": "<own tenant>[:<task>]@v<N>"`; anything else is 403 (another
        tenant's adapter is never looked up, so the answer reveals nothing about it). A pin of one
        task with another task named (X-Task / `task`) is 400."""
        pin = cls._own_pin(req)
        if pin is None:
            raise AdapterNotAllowed(f"'adapter' may be \"base\" or one of tenant {req.tenant!r}'s own versions "
                                    f"(\"{req.tenant}@vN\" or \"{req.tenant}:<task>@vN\")")
        if req.task is not None and req.task != pin[0]:
            raise InvalidRequest(f"'adapter' {req.adapter!r} is a version of task {pin[0]!r}, "
                                 f"not of the task named, {req.task!r}")
        return pin

    def _explicit_version(self, current: TenantRecord, version: int) -> TenantRecord:
        record = self._history_version(current, version)
        if record is None:
            raise InvalidRequest(f"tenant {current.tenant_id!r} has no adapter version "
                                 f"'{adapter_id(current.tenant_id, version, current.task)}'")
        return record

    def _history_version(self, current: TenantRecord, version: int) -> TenantRecord | None:
        """A version of `current`'s task from its history, with the tenant's live status; None if absent."""
        record = self.resolver.resolve_version(current.tenant_id, version, current.task)
        return None if record is None else replace(record, status=current.status)

    def _tokenize(self, plan: Plan) -> Plan:
        req = plan.request
        if req.messages is not None:
            ids = encode_messages(self.tokenizer, req.messages)  # content is text, never special tokens
        else:  # a raw prompt is the tenant's whole input, special tokens included
            ids = [int(t) for t in self.tokenizer(req.prompt, add_special_tokens=True)["input_ids"]]
        if len(ids) > self.config.max_prompt_tokens:
            raise PromptTooLong(f"prompt has {len(ids)} tokens; this server allows at most "
                                f"{self.config.max_prompt_tokens}")
        return replace(plan, input_ids=tuple(ids))

    def sampling(self, req: InferenceRequest) -> SamplingParams:
        max_new = req.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, self.config.max_new_tokens_cap)
        if not req.do_sample:
            return SamplingParams(max_new_tokens=max_new, logprobs=req.logprobs)
        return SamplingParams(max_new_tokens=max_new, do_sample=True, temperature=req.temperature,
                              top_p=req.top_p, seed=req.seed, logprobs=req.logprobs)

    def answer(self, plan: Plan, out: GenerationOutput) -> "Answer":
        """The row's reply, its text and its completion tokens (after a stop-string cut): the one
        place a reply body is built, for both schedulers."""
        token_ids, finish_reason = out.token_ids, out.finish_reason
        text = self.decode(token_ids)
        cut = stop_cut(text, plan.request.stop)
        if cut >= 0:
            text, finish_reason = text[:cut], "stop"
            token_ids = token_ids[:covering(lambda n: len(self.decode(out.token_ids[:n])), len(token_ids), cut)]
        if plan.fallback:
            kind = plan.fallback.split(":")[0]
            self.fallbacks[kind] = self.fallbacks.get(kind, 0) + 1
            self.metrics.fallback(_metric_tenant(plan), None, kind, task=_metric_task(plan))
        body = {
            "text": text,
            "tenant": plan.request.tenant,
            "task": plan.record.task if plan.record is not None else None,  # the task that served it
            "adapter": plan.record.adapter_id if plan.record is not None else "base",
            "version": plan.record.version if plan.record is not None else None,  # the version that served it
            "version_by": plan.version_by if plan.record is not None else None,  # pinned | split | current | ...
            "fallback": plan.fallback,
            "route": plan.route.to_dict() if plan.route is not None else None,
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": len(plan.input_ids), "completion_tokens": len(token_ids)},
        }
        if plan.request.logprobs and out.token_logprobs is not None and out.top_logprobs is not None:
            kept = len(token_ids)
            body["logprobs"] = logprobs_body(self.token_text, out.token_ids[:kept], out.token_logprobs[:kept],
                                             out.top_logprobs[:kept])
        if plan.record is not None:
            self.splits.served(plan.record, plan.version_by)
        reply = Reply(200, "OK", (plan.exchange or JsonExchange(plan.request)).reply(body))
        return Answer(reply, text, len(token_ids))

    def decode(self, token_ids: Sequence[int]) -> str:
        """A reply's text (special tokens skipped)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token on its own, special tokens shown (the logprobs' `tokens`)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def failed(self, exc: BaseException, render: Callable[[BaseException], dict] = error_body) -> Reply:
        """The reply of a failed request, in its API's error shape (`render`)."""
        code, phrase = http_status(exc)
        if code >= 500 and not isinstance(exc, QueueFull):  # a full queue is load, counted, not logged each time
            log.warning("request failed with %d: %s: %s", code, type(exc).__name__, exc)
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else {}
        return Reply(code, phrase, render(exc), headers)

    # -- management ----------------------------------------------------------------

    def describe(self) -> dict:
        """What `GET /models/<name>?customized=true` shows: PEFT-style state plus residency and the
        scheduler. Continuous: the engine and residency part is read on the scheduler thread."""
        view = self._engine_view() if self.scheduler is None else self.scheduler.call(self._engine_view)
        view["counters"].update(fallbacks=dict(self.fallbacks), requests=self.requests, engine_calls=self.batches,
                                registry_stale_hits=self.resolver.stale_hits,
                                registry_events=self.resolver.events_seen)
        view["router"] = self.router.describe()  # task router: routed, errors, unknown_task, cache
        view["splits"] = self.splits.snapshot()  # tenant -> task -> {"v<N>": requests answered by the split}
        return view

    def _engine_view(self) -> dict:
        """The engine's and the residency's state (on the thread that owns them)."""
        self.residency.evict_idle()
        snap = self.residency.snapshot()
        status = self.engine.get_model_status()
        scheduler: dict[str, Any] = {"kind": self.scheduler_kind, "running": 0, "waiting": 0,
                                     "kv_utilisation": 0.0, "captures_after_warmup": None}
        if self.scheduler is not None:
            stepper = self.scheduler.stepper.describe()
            scheduler.update(self.scheduler.snapshot(), kv_utilisation=stepper.get("kv_utilisation", 0.0),
                             captures_after_warmup=stepper.get("captures_after_warmup"), stepper=stepper)
        return {
            "worker": {"pid": os.getpid()},
            "engine": self.engine.kind,
            "active_adapter": self.engine.active_adapter,
            "resident": snap["resident"],
            "max_resident": snap["max_resident"],
            "idle_ttl_s": snap["idle_ttl_s"],
            "quarantined": snap["quarantined"],
            "pinned": snap["pinned"],
            "held": snap["held"],
            "host_tier": snap["host_tier"],
            "fetch": snap["fetch"],
            "last_acquire": snap["last_acquire"],
            "peft_config": {name: _json_safe(_config_dict(cfg)) for name, cfg in self.engine.peft_config.items()},
            "decode": {"mode": status.get("decode", "generate"), **(status.get("decoder") or {})},
            "kernel_variants": int(status.get("triton_variants", 0)),  # Triton compiles so far (GPU)
            "scheduler": _json_safe(scheduler),
            "counters": dict(snap["counters"]),
        }


def _wait(ticket: Ticket) -> Reply:
    """The reply of a ticket (its deltas are dropped: the reply carries the whole text)."""
    while True:
        event = ticket.get()
        if isinstance(event, Finished):
            return event.reply


def engine_settings(config: LoraplexConfig) -> EngineSettings:
    """The engine's settings from the one config (slot 0 = the base model, one spare slot the
    residency loads into before evicting, the rest resident adapters)."""
    return EngineSettings(
        num_slots=config.num_slots, max_rank=config.max_rank, target_modules=tuple(config.target_modules),
        decode=config.decode, decode_graph_buckets=config.decode_graph_buckets,
        lora_backend=config.lora_backend, triton_pdl=config.triton_pdl,
        cpu_gather_workspace_mb=config.cpu_gather_workspace_mb)


def _config_dict(cfg: Any) -> dict:
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg) if isinstance(cfg, Mapping) else {"repr": repr(cfg)}


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def _tenants(plans: Mapping[int, Plan], rows) -> list[str]:
    """The tenants (a client's OpenAI `model`) whose adapters these rows need, in arrival order."""
    return list(dict.fromkeys(plans[i].record.tenant_id for i in rows if plans[i].record is not None))


def _metric_tenant(plan: Plan) -> str | None:
    """The tenant label of a row: a registered tenant's id; None ("_none") for no tenant or an
    unknown one (a name nobody registered never becomes a label)."""
    if plan.record is not None:
        return plan.record.tenant_id
    return None if plan.fallback in ("no_tenant", "unknown_tenant") else plan.request.tenant


def _metric_task(plan: Plan) -> str | None:
    """The task label of a row: the served record's task; None ("none") for a base-model row."""
    return plan.record.task if plan.record is not None else None
