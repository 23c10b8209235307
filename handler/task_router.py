"""Step 2 of planning a request: which of the tenant's tasks serves it.

    explicit task (X-Task, body "task", OpenAI model "acme:task", a pin "acme:task@vN")  -> by "header"
    else tenant policy `router: classify` with examples -> the router's pick              -> by "classify"
                                                                                            (or the plug-in's name)
    else                                                                                  -> "default", by "default"

The built-in router (`EmbeddingRouter`) embeds the prompt with the base model's own mean-pooled last
hidden state (`Engine.embed`, handler/engine/embedding.py) and picks the task whose example prompts'
centroid is nearest by cosine similarity, after subtracting the mean of the tenant's task centroids
from every vector. Why the centroid and the centring: README "Task router" gives the measurements
(tests/demo/test_router_accuracy.py prints them for both methods). In short, a centroid cannot be
captured by one odd example as the nearest example can, and without the centring every cosine is
close to 1 (a causal LM's states share one large component), so `score` would say little.
`score` is the winning cosine in the centred space (-1..1).

A platform engineer may plug in a router instead (config `task_router: "package.module:callable"`):
`callable(prompt: str, examples: Mapping[str, Sequence[str]]) -> RouteDecision | str | (task, score)`,
`examples` holding the tenant's tasks' example prompts (only tasks the tenant has). The reply's
`route.by` is then the configured name. A router that raises, or returns something that is not one
of the tenant's tasks, costs the request nothing: it is served by the tenant's default task
(`by: "default"`) and counted (`TaskRouting.errors` / `unknown_task`, in describe), never a 5xx.

Concurrency: `TaskRouting.decide` runs on the thread that plans the request (any thread in
continuous mode, the worker thread in static mode); the built-in router's `embed` callable runs the
engine on the thread that owns it (the service passes one that goes through `Scheduler.call`). The
example cache and the counters are guarded by a lock held only for dict and counter updates.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from loraplex_common.config import ConfigError
from tenant_registry.ids import DEFAULT_TASK

log = logging.getLogger(__name__)

BY_HEADER = "header"      # the request named its task
BY_DEFAULT = "default"    # no task named and no router pick: the tenant's default task
BY_CLASSIFY = "classify"  # the built-in router picked it
BUILTIN = "builtin"       # config `task_router` value of the built-in router
MAX_ROUTE_TOKENS = 256    # the prompt's first tokens the built-in router embeds (bounds its cost)
MAX_CACHED_TASKS = 4096   # (tenant, task, examples) entries kept by the built-in router (LRU)
METHODS = ("centroid", "nearest")


@dataclass(frozen=True)
class RouteDecision:
    """Which task serves a request and why (the reply's `route`)."""

    task: str
    by: str
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "by": self.by, "score": self.score}


class TaskRouter(Protocol):
    """A router: the prompt and the tenant's tasks' example prompts -> the task to serve it."""

    def __call__(self, prompt: str, examples: Mapping[str, Sequence[str]]) -> "RouteDecision | str | tuple": ...


def routing_text(prompt: str | None, messages: Sequence[Mapping[str, str]] | None) -> str:
    """What a request is routed by: its raw prompt, or its last user message (the question being
    asked; a chat's earlier turns and the template's tokens are the same for every task)."""
    if prompt is not None:
        return prompt
    turns = list(messages or ())
    users = [m["content"] for m in turns if m.get("role") == "user" and m.get("content", "").strip()]
    return users[-1] if users else (turns[-1]["content"] if turns else "")


class EmbeddingRouter:
    """The built-in router. `embed(list of token-id lists) -> Tensor [n, hidden]` runs the base model
    (on the engine's thread; the caller's concern); `tokenize(text) -> token ids`. Example embeddings
    are cached per (tenant, task, sha256 of the task's examples), so a tenant's examples are embedded
    once per worker and again only when they change."""

    def __init__(self, embed: Callable[[list[list[int]]], torch.Tensor], tokenize: Callable[[str], Sequence[int]],
                 *, method: str = "centroid", max_tokens: int = MAX_ROUTE_TOKENS,
                 max_cached: int = MAX_CACHED_TASKS) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self._embed = embed
        self._tokenize = tokenize
        self.method = method
        self.max_tokens = max_tokens
        self.max_cached = max_cached
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()  # -> [k, hidden]
        self.embed_calls = 0  # engine calls made (tests: the cache works)

    def __call__(self, prompt: str, examples: Mapping[str, Sequence[str]]) -> RouteDecision:
        return self.route("", prompt, examples)

    def route(self, tenant: str, prompt: str, examples: Mapping[str, Sequence[str]]) -> RouteDecision:
        """The task whose examples are nearest to `prompt` (see the module docstring)."""
        tasks = [t for t in examples if examples[t]]
        if not tasks:
            raise ValueError("no task has example prompts")
        keys = {t: (tenant, t, _digest(examples[t])) for t in tasks}
        with self._lock:
            known = {t: self._cache[k] for t, k in keys.items() if k in self._cache}
            for k in keys.values():
                if k in self._cache:
                    self._cache.move_to_end(k)
        missing = [t for t in tasks if t not in known]
        texts = [prompt] + [x for t in missing for x in examples[t]]
        vectors = self._embed([self._ids(x) for x in texts])  # one engine call: the prompt and new examples
        with self._lock:
            self.embed_calls += 1
        query, start = vectors[0], 1
        for t in missing:
            n = len(examples[t])
            known[t] = vectors[start:start + n].float().clone()  # not a view: the batch is not kept alive
            start += n
            with self._lock:
                self._cache[keys[t]] = known[t]
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
        scores = self.scores(query, {t: known[t] for t in tasks})
        best = max(tasks, key=lambda t: scores[t])
        return RouteDecision(best, BY_CLASSIFY, round(scores[best], 4))

    def scores(self, query: torch.Tensor, examples: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Each task's cosine similarity to the query: to its centroid or its nearest example, in the
        space centred on the mean of the task centroids (no centring with a single task: it would
        leave nothing)."""
        means = torch.stack([e.mean(0) for e in examples.values()])
        offset = means.mean(0) if len(examples) > 1 else torch.zeros_like(means[0])
        q = _unit(query.float() - offset)
        out = {}
        for task, e in examples.items():
            units = _unit(e - offset)
            if self.method == "centroid":
                out[task] = float(_unit(units.mean(0)) @ q)
            else:
                out[task] = float((units @ q).max())
        return out

    def cached(self) -> int:
        with self._lock:
            return len(self._cache)

    def _ids(self, text: str) -> list[int]:
        ids = [int(t) for t in self._tokenize(text)][:self.max_tokens]
        return ids or [0]  # an all-whitespace text still gets a vector


class TaskRouting:
    """Step 2 of the planning: explicit task > router > the default task, with its counters.
    `builtin` serves tenants when `plugin` is None (config `task_router: builtin`)."""

    def __init__(self, builtin: EmbeddingRouter | None, plugin: TaskRouter | None = None,
                 plugin_name: str = BUILTIN) -> None:
        if builtin is None and plugin is None:
            raise ValueError("TaskRouting needs the built-in router or a plug-in")
        self.builtin = builtin
        self.plugin = plugin
        self.name = plugin_name if plugin is not None else BUILTIN
        self._lock = threading.Lock()
        self.routed = 0        # requests a router picked the task of
        self.errors = 0        # router raised or returned no task: default task served
        self.unknown_task = 0  # router returned a task the tenant does not have: default task served

    @staticmethod
    def explicit(task: str) -> RouteDecision:
        return RouteDecision(task, BY_HEADER)

    @staticmethod
    def default() -> RouteDecision:
        """The tenant's default task, no router pick (router header, no examples, a router failure, or
        a named task the tenant does not have under `unknown_task_policy: default`)."""
        return RouteDecision(DEFAULT_TASK, BY_DEFAULT)

    def decide(self, tenant: str, text: str, router: str, examples: Mapping[str, Sequence[str]],
               tasks: Sequence[str]) -> RouteDecision:
        """The task of a request that named none. `router`: the tenant policy's ("header" |
        "classify"); `examples`: its task -> example prompts; `tasks`: the tasks the tenant has now.
        Never raises: any router failure is the default task, counted."""
        fallback = self.default()
        have = {t: tuple(x) for t, x in examples.items() if t in tasks and x}
        if router != "classify" or not have:
            return fallback
        try:
            if self.plugin is not None:
                decision = _decision(self.plugin(text, have), self.name)
            else:
                decision = self.builtin.route(tenant, text, have)
        except Exception as exc:
            log.warning("task router %s failed for tenant %r (default task served): %s: %s", self.name, tenant,
                        type(exc).__name__, exc)
            self._count("errors")
            return fallback
        if decision.task not in tasks:
            log.warning("task router %s returned task %r, which tenant %r does not have (default task served)",
                        self.name, decision.task[:64], tenant)
            self._count("unknown_task")
            return fallback
        self._count("routed")
        return decision

    def describe(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"router": self.name, "routed": self.routed, "errors": self.errors,
                                   "unknown_task": self.unknown_task}
        if self.plugin is None:
            out.update(method=self.builtin.method, cached_tasks=self.builtin.cached())
        return out

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


def make_routing(spec: str, tokenize: Callable[[str], Sequence[int]],
                 embed: Callable[[list[list[int]]], torch.Tensor]) -> TaskRouting:
    """The worker's routing for config `task_router`: the built-in router over `embed` (the engine's,
    on its thread) and `tokenize`, or the plug-in it names (ConfigError naming the key when that
    cannot be imported, so the worker does not start with a router it cannot run)."""
    if spec == BUILTIN:
        return TaskRouting(EmbeddingRouter(embed, tokenize))
    try:
        plugin = load_plugin(spec)
    except ValueError as exc:
        raise ConfigError(str(exc), key="task_router") from None
    return TaskRouting(None, plugin, spec)


def load_plugin(spec: str) -> TaskRouter:
    """The callable named "package.module:callable" (the attribute may be dotted: "mod:Class.method").
    Raises ValueError naming what is missing (the service reports it as a config error)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"task_router must be 'builtin' or 'package.module:callable', got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"task_router {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"task_router {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise ValueError(f"task_router {spec!r} is not callable")
    return target


def _decision(value: Any, name: str) -> RouteDecision:
    """A plug-in's answer as a RouteDecision `by` its configured name."""
    score = None
    if isinstance(value, RouteDecision):
        task, score = value.task, value.score
    elif isinstance(value, str):
        task = value
    elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        task, score = value
    else:
        raise TypeError(f"returned {type(value).__name__}, not a RouteDecision, a task name or (task, score)")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
            raise TypeError(f"returned score {score!r}, not a number")
        score = float(score)
    return RouteDecision(task, name, score)


def _digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1, eps=1e-12)
