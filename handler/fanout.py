"""Fan-out: one request served as several rows of ONE batch (issue 14 items 4 and 5).

    Plan (the tenant's checks passed) ─► FanoutPlanner.plan: step 4 of the planning, one row
        or a fan-out (`Plan.fanout`): a confidence fallback chain (the tenant's policy) or compare
        mode (the request's `compare`) ─► row_plans: one Plan per link, each exactly the plan that
        link alone would have ─► the rows run together (static: one `engine.generate`; continuous:
        admitted together, handler/scheduler.py) ─► merge: the rows' answers back into one reply.

Chain: the tenant's `TenantPolicy.chain` (links in order, the last one `base`) and
`chain_threshold`. It applies to a request that names no task, no `adapter` (pin or base) and no
`compare`: naming one of those is choosing the adapter yourself. The service asks `chained` before
it routes or splits (the links name their own tasks and versions), so such a plan carries only the
tenant's checks and a record of one of its tasks. Every link is a row; the answer is
the first link in chain order whose score, the mean log-probability of its returned tokens (the
engine's, `SamplingParams.logprobs`: log_softmax of the raw logits, before temperature and top-p),
is >= the threshold; when none is, the last link (base). An answer with no tokens has no score and
never clears the threshold. A link whose task or version has gone since the chain was set is left
out (reported with score null and `"skipped"`); the base link always runs.

Compare: `"compare": [...]` or `"all_versions"` (every version in the history of the request's task,
oldest first, then base). Entries: "base", "vN" (version N of the request's task), "<task>" (its
current version), "<task>@vN", or a full adapter id of the caller's own ("<tenant>:<task>@vN");
another tenant's adapter is 403 (never looked up), a task or version the tenant does not have 404 /
400, as for a pin. Each row's reply is exactly what that link alone would answer.

Limits: at most `max_fanout_rows` rows (config), at most the resident adapters a worker holds
(`num_slots - 2`: one engine call must hold them all) and, continuous, at most `kv_rows` (they run
at once). Over any of them: 400 naming the limit. Streaming: compare refuses it (request.py); a
chain's reply streams as one text chunk once every link is done (the choice needs all answers).

Pure planning and merging; `FanoutPlanner.plan` reads the tenant cache (locked, tenants.py) and may
ask the registry for a task's history (all_versions): any thread, like the rest of the planning.
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tenant_registry.errors import InvalidTenantId, PolicyInvalid, TaskNotFound, TenantNotFound
from tenant_registry.ids import BASE_LINK, adapter_id, format_link, parse_link, parse_task_adapter_id
from tenant_registry.schema import ChainLink, TenantRecord

from .ab_split import CURRENT, PINNED
from .engine.api import GenerationOutput, SamplingParams
from .errors import AdapterNotAllowed, InvalidRequest
from .request import ALL_VERSIONS, InferenceRequest
from .routes import JsonExchange

if TYPE_CHECKING:
    from .service import Answer, Plan, Reply
    from .tenants import TenantResolver

_VERSION_RE = re.compile(r"v([1-9][0-9]{0,8})")


class FanoutKind(enum.Enum):
    CHAIN = "chain"      # the tenant's confidence fallback chain
    COMPARE = "compare"  # the request's compare mode


CHAIN, COMPARE = FanoutKind.CHAIN, FanoutKind.COMPARE


@dataclass(frozen=True)
class Link:
    """One row of a fan-out: its name as the reply shows it, the record that serves it (None = the
    base model) and why that version (ab_split.PINNED: the link names it; CURRENT: the task's
    current one; None on base), which the row's reply and the split counters read."""

    name: str
    record: TenantRecord | None
    version_by: str | None = None


@dataclass(frozen=True)
class Fanout:
    """How a request fans out: `kind` CHAIN or COMPARE, its rows' links in order, the chain's
    threshold, and the chain links left out (their task or version is gone)."""

    kind: FanoutKind
    links: tuple[Link, ...]
    threshold: float | None = None
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class RowResult:
    """One served row: its plan, the engine's output and the reply that link alone would get."""

    plan: "Plan"
    output: GenerationOutput
    answer: "Answer"


class FanoutPlanner:
    """Step 4 of the service's planning (one row, or a chain / compare fan-out)."""

    def __init__(self, resolver: "TenantResolver", history: Callable[[str, str], Sequence[TenantRecord]], *,
                 max_rows: int, max_adapters: int, max_running: int | None) -> None:
        self._resolver = resolver
        self._history = history  # (tenant, task) -> the task's records, oldest first (TaskNotFound)
        self.max_rows = max_rows
        self.max_adapters = max_adapters
        self.max_running = max_running  # continuous: KV rows (a fan-out's rows run at once); None: static

    def chained(self, req: InferenceRequest) -> bool:
        """True when the tenant's fallback chain serves this request: its tenant has a chain and it
        names no task, no `adapter` (pin or base) and no `compare`. The service asks before routing
        and A/B splits (the chain's links name their own tasks and versions)."""
        if req.tenant is None or req.adapter is not None or req.task is not None or req.compare is not None:
            return False
        return bool(self._resolver.policy(req.tenant).chain)

    def plan(self, plan: "Plan") -> "Plan":
        """The plan with its fan-out decided (`Plan.fanout`), or unchanged (one row)."""
        req = plan.request
        if req.compare is not None:
            return replace(plan, fanout=self._checked(self._compare(plan)))
        if plan.record is None or not self.chained(req):
            return plan  # no tenant, an unknown one, a pin, base, a task the caller chose, or no chain
        policy = self._resolver.policy(req.tenant)
        return replace(plan, fanout=self._checked(self._chain(req.tenant, policy.chain, policy.chain_threshold)))

    # -- compare ---------------------------------------------------------------------

    def _compare(self, plan: "Plan") -> Fanout:
        req = plan.request
        if plan.record is None:  # _plan let the request through without a record: an unknown tenant
            raise TenantNotFound(req.tenant)
        tenant, task = req.tenant, plan.record.task
        if req.compare == ALL_VERSIONS:
            history = self._history(tenant, task)
            links = [Link(f"v{r.version}", r, PINNED) for r in history] + [Link(BASE_LINK, None)]
            if len(links) > self.max_rows:
                raise InvalidRequest(f"'compare': \"all_versions\" is {len(links)} rows (task {task!r} has "
                                     f"{len(history)} versions, plus base); this server runs at most {self.max_rows} "
                                     f"per request (max_fanout_rows): list the versions to compare")
            return Fanout(COMPARE, tuple(links))
        if len(req.compare) > self.max_rows:
            raise InvalidRequest(f"'compare' names {len(req.compare)} rows; this server runs at most "
                                 f"{self.max_rows} per request (max_fanout_rows)")
        return Fanout(COMPARE, tuple(self._link(tenant, entry, self._compare_link(tenant, task, entry))
                                     for entry in req.compare))

    @staticmethod
    def _compare_link(tenant: str, task: str, entry: str) -> ChainLink:
        """One compare entry -> a link of the caller's own (see the module docstring)."""
        m = _VERSION_RE.fullmatch(entry)
        if m is not None:
            return ChainLink(task=task, version=int(m.group(1)))
        if ":" in entry:  # a full adapter id: the caller's own only
            try:
                owner, its_task, version = parse_task_adapter_id(entry)
            except InvalidTenantId as exc:
                raise InvalidRequest(f"'compare' entry {entry[:60]!r}: {exc}") from None
            if owner != tenant:
                raise AdapterNotAllowed(f"'compare' entry {entry[:60]!r} is not one of tenant {tenant!r}'s own "
                                        f"versions: name your own tasks and versions only")
            return ChainLink(task=its_task, version=version)
        try:
            return parse_link(entry)
        except (PolicyInvalid, ValueError) as exc:
            raise InvalidRequest(f"'compare' entry {entry[:60]!r}: {exc}; expected \"base\", \"vN\", "
                                 f"\"<task>\", \"<task>@vN\" or \"{tenant}:<task>@vN\"") from None

    # -- chain -----------------------------------------------------------------------

    def _chain(self, tenant: str, chain: Sequence[ChainLink], threshold: float | None) -> Fanout:
        links, skipped = [], []
        for link in chain:
            try:
                links.append(self._link(tenant, format_link(link), link))
            except (TenantNotFound, InvalidRequest):  # gone since the chain was set: leave it out
                skipped.append(format_link(link))
        return Fanout(CHAIN, tuple(links), threshold, tuple(skipped))

    # -- both ------------------------------------------------------------------------

    def _link(self, tenant: str, name: str, link: ChainLink) -> Link:
        record = self._record(tenant, link)
        return Link(name, record, None if record is None else PINNED if link.version is not None else CURRENT)

    def _record(self, tenant: str, link: ChainLink) -> TenantRecord | None:
        """The record serving a link (None: base). TaskNotFound (404) for a task the tenant does not
        have; InvalidRequest (400) for a version its task does not have (a pin's rules)."""
        if link.base:
            return None
        current = self._resolver.resolve(tenant, link.task)
        if current is None:
            raise TaskNotFound(tenant, link.task)
        if link.version is None or link.version == current.version:
            return current
        record = self._resolver.resolve_version(tenant, link.version, link.task)
        if record is None:
            raise InvalidRequest(f"tenant {tenant!r} has no adapter version "
                                 f"'{adapter_id(tenant, link.version, link.task)}'")
        return replace(record, status=current.status)

    def _checked(self, fanout: Fanout) -> Fanout:
        """400 for a fan-out one engine call (or the KV rows) cannot hold."""
        rows = len(fanout.links)
        what = "'compare'" if fanout.kind == COMPARE else "the tenant's fallback chain"
        if rows > self.max_rows:
            raise InvalidRequest(f"{what} is {rows} rows; this server runs at most {self.max_rows} per request "
                                 f"(max_fanout_rows)")
        if self.max_running is not None and rows > self.max_running:
            raise InvalidRequest(f"{what} is {rows} rows; this worker runs at most {self.max_running} rows at "
                                 f"once (kv_rows)")
        adapters = {link.record.adapter_id for link in fanout.links if link.record is not None}
        if len(adapters) > self.max_adapters:
            raise InvalidRequest(f"{what} needs {len(adapters)} adapters in one batch; this worker holds at most "
                                 f"{self.max_adapters} at once (num_slots - 2)")
        return fanout


# -- rows and replies (both schedulers) --------------------------------------------------

def row_plans(plan: "Plan") -> list["Plan"]:
    """The plan of each row: a plain plan is its own one row; a fan-out's row k is the plan link k
    alone would have (its record and version_by, no fallback; no route: the chain or compare chose
    the task, not the router) answering in our JSON shape, so `merge` can put the rows' bodies
    together before the request's own API shapes the reply."""
    if plan.fanout is None:
        return [plan]
    return [replace(plan, record=link.record, fallback=None, fanout=None, exchange=JsonExchange(plan.request),
                    version_by=link.version_by, route=None)
            for link in plan.fanout.links]


def row_sampling(plan: "Plan", params: SamplingParams) -> SamplingParams:
    """A row's sampling: a chain's rows need the chosen tokens' log-probabilities (the score) even
    when the request asked for none (the reply shows them only when asked)."""
    if plan.fanout is not None and plan.fanout.kind == CHAIN and params.logprobs < 1:
        return replace(params, logprobs=1)
    return params


def adapters(plan: "Plan") -> set[str]:
    """Adapter ids every row of the plan needs (for the static path's waves)."""
    return {p.record.adapter_id for p in row_plans(plan) if p.record is not None}


def score(result: RowResult) -> float | None:
    """Mean log-probability of the row's returned tokens (after a stop cut); None for no tokens."""
    kept = result.answer.tokens
    logprobs = result.output.token_logprobs
    if kept == 0 or logprobs is None:
        return None
    return math.fsum(logprobs[:kept]) / kept


def merge(plan: "Plan", results: Sequence[RowResult]) -> "Reply":
    """The request's one reply from its rows' results (in link order): a chain's answering link's
    reply plus `chain`, or compare's rows side by side. A plain plan: its row's reply."""
    from .service import Reply

    if plan.fanout is None:
        return results[0].answer.reply
    exchange = plan.exchange or JsonExchange(plan.request)
    fanout = plan.fanout
    if fanout.kind == COMPARE:
        rows = [_compare_row(link, result) for link, result in zip(fanout.links, results)]
        body = {"tenant": plan.request.tenant, "compare": rows}
        return Reply(200, "OK", exchange.reply(body))
    scores = [score(r) for r in results]
    answered = next((i for i, s in enumerate(scores)
                     if s is not None and (fanout.threshold is None or s >= fanout.threshold)), len(results) - 1)
    links: list[dict[str, Any]] = [{"link": link.name, "score": s, "text": r.answer.text}
                                   for link, r, s in zip(fanout.links, results, scores)]
    links += [{"link": name, "score": None, "skipped": "its task or version no longer exists"}
              for name in fanout.skipped]
    body = {**results[answered].answer.reply.body,
            "chain": {"answered_by": fanout.links[answered].name, "threshold": fanout.threshold, "links": links}}
    return Reply(200, "OK", exchange.reply(body))


def _compare_row(link: Link, result: RowResult) -> dict[str, Any]:
    body = dict(result.answer.reply.body)
    body.pop("tenant", None)  # the request's, said once at the top
    record = result.plan.record
    return {"link": link.name, "version": record.version if record is not None else None,
            "tokens": list(result.output.token_ids[:result.answer.tokens]), **body}
