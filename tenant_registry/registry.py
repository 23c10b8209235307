"""TenantRegistry: tenant records in Redis, atomic changes, and change events.

Redis layout (P = prefix, t = tenant id, k = task name; ids are validated, so keys cannot collide or
inject; neither holds ':'). A tenant owns one or more *tasks*, each its own adapter line (current
record + history); the task `default` keeps the keys it had before tasks existed:
  P:tenant:<t>        string  current TenantRecord JSON of the default task (what workers serve)
  P:history:<t>       hash    "<version>" -> TenantRecord JSON as onboarded (kept for rollback)
  P:task:<t>:<k>      string  current record of a named task k (k != default)
  P:task_history:<t>:<k> hash  that task's history
  P:tasks:<t>         set     the tenant's named tasks with a current record (not `default`)
  P:tenants           set     tenant ids with at least one current record (for `list`)
  P:version_seq:<t>   string  highest version ever handed out, one counter for all the tenant's tasks;
                              survives `remove`, so a version number (and adapter id "t@vN" /
                              "t:k@vN") is never reused for different weights
  P:key:<t>           string  KeyDigest JSON of the tenant's key (salted HMAC-SHA256; the key itself
                              is never stored); absent until a key is issued; deleted by `remove`
  P:pinned            zset    tenants kept resident on every worker (`tenantctl pin`), score = when
                              pinned (workers keep the first `max_pinned_adapters`); not a record
                              field, so pinning never rewrites a record or its history
  P:usage             zset    tenant -> requests served with its adapter (workers add their counts;
                              `prefetch_top_n` loads the most used at worker start)
  P:policy:<t>        string  TenantPolicy JSON (schema.py: router, A/B splits, fallback chain, router
                              examples); absent = TenantPolicy(). Written only by `update_policy` (and
                              pruned by `remove`/`rollback` of a task it names, `restore`); deleted by
                              `remove` of the whole tenant
  P:events            channel JSON events {"tenant": t, "version": v|null, "kind": k, "task": task|null},
                              k in onboard|disable|enable|remove|rollback|key|import|pin|unpin|policy
                              ("key": the tenant's key digest was set or replaced; "import": the
                              tenant was written by `backup.import_registry`; "policy": the tenant's
                              policy changed, version and task null); "task" names
                              the line an onboard/rollback/remove changed, null when the event
                              covers the whole tenant (status, key, import, pins, remove of all)

The tenant's status covers all its tasks: it is stored on every line's current record and
`set_status` rewrites them all in one transaction; a new task takes the status the others have.

Atomicity: every change is one WATCH/MULTI/EXEC transaction that updates the current record, the
history and the tenant set together and PUBLISHes its event inside the same EXEC, so a subscriber
never sees an event before the change it announces (redis-py retries the transaction when a watched
key changed under it).

Timeouts (so a dead or hung Redis never stalls a caller for long):
  connect 1.0 s, each command 2.0 s, one immediate retry on a connection error (it re-dials once,
  which is what makes the first call after a Redis restart succeed). Worst case for one call on a
  black-holed host: about 2 s + 2 s; on a stopped local server: a few milliseconds.
Every redis exception becomes RegistryUnavailable (the original is the __cause__).

Threads: one TenantRegistry may be shared by threads (redis-py's pool is thread-safe). `subscribe`
runs its callback on its own daemon thread.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import (ConfigError, RegistryError, RegistryUnavailable, TenantExists, TenantNotFound,
                     VersionConflict, VersionNotFound)
from .errors import PolicyInvalid, TaskNotFound
from .ids import DEFAULT_TASK, is_valid_task, is_valid_tenant_id, validate_task, validate_tenant_id
from .keys import KeyDigest
from .ids import format_link
from .schema import STATUSES, RecordError, TenantPolicy, TenantRecord

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 2.0
SUBSCRIBER_POLL_S = 0.5          # how often the subscriber thread checks its stop event
SUBSCRIBER_HEALTH_CHECK_S = 5    # PING on an idle subscription so a dead connection is noticed
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0
EVENT_KINDS = ("onboard", "disable", "enable", "remove", "rollback", "key", "import", "pin", "unpin", "policy")

EventCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TaskLine:
    """One task's current record and full history (oldest first), as in a snapshot."""

    current: TenantRecord
    history: tuple[TenantRecord, ...]


@dataclass(frozen=True)
class TenantSnapshot:
    """Everything the registry holds about one tenant, read (or written) atomically: the default
    task's current record and full history (oldest first; `current` None when the tenant has no
    default task), its named tasks' lines (`tasks`, sorted by name), the key digest and the version
    counter. Used by backup/restore.

    Checked on construction (RecordError): one tenant throughout, at least one line, each line of
    one task with distinct history versions and its current version in its history, matching it in
    everything but status/updated_at (which `set_status` and `rollback` change on the current record
    only), no version in two lines, and the counter at least the newest version of any line.
    """

    current: TenantRecord | None
    history: tuple[TenantRecord, ...]
    key_digest: KeyDigest | None
    version_seq: int
    tasks: tuple[TaskLine, ...] = ()
    policy: TenantPolicy | None = None  # None = no stored policy (TenantPolicy()); checked against the lines

    def __post_init__(self) -> None:
        hist = tuple(sorted(self.history, key=lambda r: r.version)) if isinstance(self.history, (tuple, list)) else None
        if hist is None or not all(isinstance(h, TenantRecord) for h in hist):
            raise RecordError("tenant snapshot history must be a list of records")
        object.__setattr__(self, "history", hist)
        tasks = self.tasks if isinstance(self.tasks, (tuple, list)) else None
        if tasks is None or not all(isinstance(line, TaskLine) for line in tasks):
            raise RecordError("tenant snapshot tasks must be a list of task lines")
        object.__setattr__(self, "tasks", tuple(sorted(tasks, key=lambda line: getattr(line.current, "task", ""))))
        lines = [(DEFAULT_TASK, self.current, hist)] if self.current is not None or hist else []
        lines += [(getattr(line.current, "task", None), line.current, line.history) for line in self.tasks]
        if not lines:
            raise RecordError("tenant snapshot needs at least one task with a current record and a history")
        t = next((c.tenant_id for _, c, _ in lines if isinstance(c, TenantRecord)), None)
        if t is None:
            raise RecordError("tenant snapshot needs a current record for each task")
        seen_tasks: set[str] = set()
        all_versions: list[int] = []
        for task, current, history in lines:
            _check_line(t, task, current, history)
            if task in seen_tasks or (task == DEFAULT_TASK and current is not self.current):
                raise RecordError(f"tenant snapshot of {t!r} holds task {task!r} twice")
            seen_tasks.add(task)
            all_versions += [h.version for h in history]
        if len(set(all_versions)) != len(all_versions):
            raise RecordError(f"tenant snapshot of {t!r} has a version in two places")
        if self.key_digest is not None and not isinstance(self.key_digest, KeyDigest):
            raise RecordError(f"key digest of {t!r} must be a KeyDigest or None")
        seq = self.version_seq
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < max(all_versions):
            raise RecordError(f"version counter of {t!r} must be an integer >= v{max(all_versions)}")
        if self.policy is not None:
            if not isinstance(self.policy, TenantPolicy):
                raise RecordError(f"policy of {t!r} must be a TenantPolicy or None")
            try:
                check_policy(t, self.policy, {task: {h.version for h in history} for task, _, history in lines})
            except PolicyInvalid as e:
                raise RecordError(f"tenant snapshot of {t!r}: {e}") from None

    @property
    def tenant_id(self) -> str:
        return (self.current or self.tasks[0].current).tenant_id

    def lines(self) -> list[TaskLine]:
        """Every task's line, the default task first when present."""
        head = [TaskLine(self.current, self.history)] if self.current is not None else []
        return head + list(self.tasks)


def _check_line(t: str, task: object, current: object, history: object) -> None:
    if not isinstance(current, TenantRecord) or not isinstance(history, (tuple, list)) or not history \
            or not all(isinstance(h, TenantRecord) for h in history):
        raise RecordError(f"task {task!r} of tenant {t!r} needs a current record and a non-empty history")
    if any(h.tenant_id != t for h in (current, *history)):
        raise RecordError(f"tenant snapshot of {t!r} holds records of another tenant")
    if any(h.task != task for h in (current, *history)):
        raise RecordError(f"task {task!r} of tenant {t!r} holds records of another task")
    versions = [h.version for h in history]
    if len(set(versions)) != len(versions):
        raise RecordError(f"tenant snapshot of {t!r} has duplicate history versions")
    h = {h.version: h for h in history}.get(current.version)
    if h is None:
        raise RecordError(f"current version v{current.version} of {t!r} is not in its history")
    if current.replace(status=h.status, updated_at=h.updated_at) != h:
        raise RecordError(f"current record of {t!r} differs from history v{h.version} (beyond status/updated_at)")


@contextlib.contextmanager
def _redis_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (redis.RedisError, OSError) as e:
        raise RegistryUnavailable(f"Redis unavailable during {what}: {type(e).__name__}: {e}") from e


class PinLimitReached(RegistryError):
    """`pin` would pin more tenants than `max_pinned_adapters`."""


class TenantRegistry:
    """Tenant records under `prefix` in the Redis at `redis_url`."""

    def __init__(self, redis_url: str, prefix: str = "loraplex", *,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, command_timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self._timeouts = (connect_timeout_s, command_timeout_s)
        self._r = self._client()
        self.channel = f"{prefix}:events"

    def _client(self, **extra: Any) -> redis.Redis:
        try:
            return redis.Redis.from_url(
                self.redis_url, socket_connect_timeout=self._timeouts[0], socket_timeout=self._timeouts[1],
                retry=Retry(NoBackoff(), 1), socket_keepalive=True, **extra)
        except ValueError as e:
            raise ConfigError(f"bad redis_url {self.redis_url!r}: {e}", key="redis_url") from e

    def close(self) -> None:
        self._r.close()

    # ------------------------------------------------------------------ keys
    def _k_current(self, t: str, task: str = DEFAULT_TASK) -> str:
        return f"{self.prefix}:tenant:{t}" if task == DEFAULT_TASK else f"{self.prefix}:task:{t}:{task}"

    def _k_history(self, t: str, task: str = DEFAULT_TASK) -> str:
        return f"{self.prefix}:history:{t}" if task == DEFAULT_TASK else f"{self.prefix}:task_history:{t}:{task}"

    def _k_tasks(self, t: str) -> str:
        return f"{self.prefix}:tasks:{t}"

    def _line_keys(self, t: str, tasks: Iterable[str]) -> list[str]:
        return [k for task in tasks for k in (self._k_current(t, task), self._k_history(t, task))]

    def _task_names(self, r: Any, t: str) -> list[str]:
        """The tenant's tasks with a current record, default first (`r`: the client or a watching pipe)."""
        named = sorted(n for n in (x.decode() for x in r.smembers(self._k_tasks(t)))
                       if is_valid_task(n) and n != DEFAULT_TASK)
        return ([DEFAULT_TASK] if r.exists(self._k_current(t)) else []) + named

    def _watch_lines(self, pipe: Any, t: str) -> list[str]:
        """Inside a transaction (before MULTI): the tenant's tasks, with every line's keys watched too."""
        tasks = self._task_names(pipe, t)
        if tasks:
            pipe.watch(*self._line_keys(t, tasks))
        return tasks

    def _k_seq(self, t: str) -> str:
        return f"{self.prefix}:version_seq:{t}"

    def _k_policy(self, t: str) -> str:
        return f"{self.prefix}:policy:{t}"

    def _k_key(self, t: str) -> str:
        return f"{self.prefix}:key:{t}"

    @property
    def _k_tenants(self) -> str:
        return f"{self.prefix}:tenants"

    @property
    def _k_pinned(self) -> str:
        return f"{self.prefix}:pinned"

    @property
    def _k_usage(self) -> str:
        return f"{self.prefix}:usage"

    def _event(self, tenant: str, version: int | None, kind: str, task: str | None = None) -> str:
        event: dict[str, Any] = {"tenant": tenant, "version": version, "kind": kind}
        if task is not None:  # a line's event; tenant-wide events keep the shape they had before tasks
            event["task"] = task
        return json.dumps(event)

    # ------------------------------------------------------------------ reads (any thread)
    def ping(self) -> bool:
        """True if Redis answers; raises RegistryUnavailable otherwise."""
        with _redis_errors("ping"):
            return bool(self._r.ping())

    def get(self, tenant: str, *, task: str = DEFAULT_TASK) -> TenantRecord:
        """The current record of the tenant's task. Raises InvalidTenantId, InvalidTaskName,
        TaskNotFound (the tenant has other tasks), TenantNotFound, RegistryUnavailable."""
        t, k = validate_tenant_id(tenant), validate_task(task)
        with _redis_errors("get"):
            raw = self._r.get(self._k_current(t, k))
        if raw is None:
            raise self._not_found(t, k)
        return TenantRecord.from_json(raw)

    def _not_found(self, t: str, task: str) -> TenantNotFound:
        """TaskNotFound when the tenant has some other task, else TenantNotFound."""
        with _redis_errors("get"):
            known = bool(self._task_names(self._r, t))
        return TaskNotFound(t, task) if known else TenantNotFound(t)

    def tasks(self, tenant: str) -> list[str]:
        """The tenant's task names, "default" first when present, the others sorted; [] if unknown."""
        t = validate_tenant_id(tenant)
        with _redis_errors("tasks"):
            return self._task_names(self._r, t)

    def list(self) -> list[TenantRecord]:
        """Every task's current record, sorted by tenant id (each tenant's default task first)."""
        with _redis_errors("list"):
            ids = sorted(x.decode() for x in self._r.smembers(self._k_tenants))
            pipe = self._r.pipeline(transaction=False)
            for t in ids:
                pipe.get(self._k_current(t)).smembers(self._k_tasks(t))
            got = pipe.execute() if ids else []
            keys = []
            for i, t in enumerate(ids):
                named = sorted(n for n in (x.decode() for x in got[2 * i + 1]) if is_valid_task(n) and n != DEFAULT_TASK)
                keys += ([self._k_current(t)] if got[2 * i] is not None else []) + [self._k_current(t, n) for n in named]
            raws = self._r.mget(keys) if keys else []
        return [TenantRecord.from_json(raw) for raw in raws if raw is not None]

    def history(self, tenant: str, *, task: str = DEFAULT_TASK) -> list[TenantRecord]:
        """All versions of the tenant's task as onboarded, oldest first (their `status` is the status
        at onboarding time; the tenant's live status is on `get`)."""
        t, k = validate_tenant_id(tenant), validate_task(task)
        with _redis_errors("history"):
            raw = self._r.hgetall(self._k_history(t, k))
        if not raw:
            raise self._not_found(t, k)
        return sorted((TenantRecord.from_json(v) for v in raw.values()), key=lambda r: r.version)

    def get_key_digest(self, tenant: str) -> KeyDigest | None:
        """The tenant's stored key digest, or None if it has none (or is not registered).
        Raises InvalidTenantId, RegistryUnavailable, KeyDigestError (a corrupt stored digest)."""
        t = validate_tenant_id(tenant)
        with _redis_errors("get_key_digest"):
            raw = self._r.get(self._k_key(t))
        return None if raw is None else KeyDigest.from_json(raw)

    def get_policy(self, tenant: str) -> TenantPolicy:
        """The tenant's policy (one GET); TenantPolicy() when none is stored (an unknown tenant too).
        Raises InvalidTenantId, RegistryUnavailable, PolicyInvalid (a corrupt stored policy)."""
        t = validate_tenant_id(tenant)
        with _redis_errors("get_policy"):
            raw = self._r.get(self._k_policy(t))
        return TenantPolicy() if raw is None else TenantPolicy.from_json(raw)

    def tenant_policy(self, tenant: str) -> TenantPolicy:
        """`get_policy` of a tenant that exists (has a task): what `tenantctl` and the HTTP API show;
        TenantNotFound otherwise."""
        if not self.tasks(tenant):
            raise TenantNotFound(tenant)
        return self.get_policy(tenant)

    # ------------------------------------------------------------------ writes (control plane)
    def next_version(self, tenant: str) -> int:
        """Reserve and return a version number never handed out before for this tenant.

        Reserving (not peeking) means two concurrent onboardings get different versions and never
        write the same store directory. A reserved version whose onboarding fails leaves a gap.
        """
        t = validate_tenant_id(tenant)

        def tx(pipe: redis.client.Pipeline) -> int:
            seq = int(pipe.get(self._k_seq(t)) or 0)
            versions = [seq]
            for task in self._watch_lines(pipe, t):  # one counter for all the tenant's tasks
                versions += [int(v) for v in pipe.hkeys(self._k_history(t, task))]
                cur = pipe.get(self._k_current(t, task))
                versions.append(TenantRecord.from_json(cur).version if cur else 0)
            nxt = max(versions) + 1
            pipe.multi()
            pipe.set(self._k_seq(t), nxt)
            return nxt

        return self._transact("next_version", tx, self._k_seq(t), self._k_tasks(t), self._k_current(t))

    def put_new_version(self, record: TenantRecord) -> TenantRecord:
        """Make `record` the current version of its task and add it to that task's history,
        atomically; publish "onboard". A record for a new task takes the status the tenant's other
        tasks have (returned as stored). Raises TenantExists if that version is already in the
        history, VersionConflict if the task's current version is already newer."""
        t, task = record.tenant_id, record.task

        def tx(pipe: redis.client.Pipeline) -> TenantRecord:
            rec = record
            if pipe.hexists(self._k_history(t, task), str(rec.version)):
                raise TenantExists(f"{rec.adapter_id} is already registered")
            cur = pipe.get(self._k_current(t, task))
            if cur is not None:
                cur_rec = TenantRecord.from_json(cur)
                if cur_rec.version >= rec.version:
                    raise VersionConflict(f"cannot register {rec.adapter_id}: current version of "
                                          f"{t!r} task {task!r} is already v{cur_rec.version}")
            else:
                others = [k for k in self._watch_lines(pipe, t) if k != task]
                other = pipe.get(self._k_current(t, others[0])) if others else None
                if other is not None:  # the tenant's status covers all its tasks
                    rec = rec.replace(status=TenantRecord.from_json(other).status)
            seq = int(pipe.get(self._k_seq(t)) or 0)
            pipe.multi()
            pipe.set(self._k_current(t, task), rec.to_json())
            pipe.hset(self._k_history(t, task), str(rec.version), rec.to_json())
            if task != DEFAULT_TASK:
                pipe.sadd(self._k_tasks(t), task)
            pipe.sadd(self._k_tenants, t)
            pipe.set(self._k_seq(t), max(seq, rec.version))
            pipe.publish(self.channel, self._event(t, rec.version, "onboard", task))
            return rec

        return self._transact("put_new_version", tx, self._k_current(t, task), self._k_history(t, task),
                              self._k_seq(t), self._k_tasks(t), self._k_current(t))

    def update_policy(self, tenant: str, change: Callable[[TenantPolicy], TenantPolicy]) -> TenantPolicy:
        """Replace the tenant's policy with `change(current)` in one WATCH/MULTI transaction, checked
        against the tenant's tasks and histories as they are in that transaction (`check_policy`:
        PolicyInvalid, nothing written); publish ONE "policy" event, so every worker's resolver drops
        its cached policy at once. Returns the stored policy. `change` may run more than once (the
        transaction is retried when a watched key changed): keep it a pure function of its argument.
        Raises TenantNotFound for an unknown tenant."""
        t = validate_tenant_id(tenant)

        def tx(pipe: redis.client.Pipeline) -> TenantPolicy:
            tasks = self._watch_lines(pipe, t)
            if not tasks:
                raise TenantNotFound(t)
            raw = pipe.get(self._k_policy(t))
            new = change(TenantPolicy() if raw is None else TenantPolicy.from_json(raw))
            if not isinstance(new, TenantPolicy):
                raise TypeError(f"update_policy's change must return a TenantPolicy, got {type(new).__name__}")
            check_policy(t, new, {k: {int(v) for v in pipe.hkeys(self._k_history(t, k))} for k in tasks})
            pipe.multi()
            self._write_policy(pipe, t, new)
            return new

        return self._transact("update_policy", tx, self._k_policy(t), self._k_current(t), self._k_tasks(t))

    def _write_policy(self, pipe: Any, t: str, policy: TenantPolicy) -> None:
        """Inside MULTI: store (an empty policy: delete) the tenant's policy and publish "policy"."""
        if policy == TenantPolicy():
            pipe.delete(self._k_policy(t))
        else:
            pipe.set(self._k_policy(t), policy.to_json())
        pipe.publish(self.channel, self._event(t, None, "policy"))

    def set_status(self, tenant: str, status: str) -> TenantRecord:
        """Enable or disable the tenant (all its tasks and versions: every task's current record is
        rewritten in one transaction); publish "enable"/"disable". Returns the first task's record
        (the default task's when it has one)."""
        t = validate_tenant_id(tenant)
        if status not in STATUSES:
            raise RegistryError(f"status must be one of {STATUSES}, got {status!r}")

        def tx(pipe: redis.client.Pipeline) -> TenantRecord:
            tasks = self._watch_lines(pipe, t)
            if not tasks:
                raise TenantNotFound(t)
            now = time.time()
            news = [TenantRecord.from_json(pipe.get(self._k_current(t, k))).replace(status=status, updated_at=now)
                    for k in tasks]
            pipe.multi()
            for new in news:
                pipe.set(self._k_current(t, new.task), new.to_json())
            pipe.publish(self.channel, self._event(t, news[0].version, "enable" if status == "enabled" else "disable"))
            return news[0]

        return self._transact("set_status", tx, self._k_current(t), self._k_tasks(t))

    def rollback(self, tenant: str, to_version: int | None = None, *, task: str = DEFAULT_TASK) -> TenantRecord:
        """Make an older (or any recorded) version of the task current again; publish "rollback".

        `to_version=None` means the newest version older than the current one. The tenant keeps its
        current status (rollback does not re-enable a disabled tenant). Newer versions stay in the
        history, so rolling forward is `rollback(t, to_version=newer)`. Only the task's own versions
        are candidates. A rollback also ends the task's A/B split, if it has one, in the same
        transaction (and publishes "policy" too): "serve this version" is what a rollback means, and
        workers see both changes at once.
        """
        t, k = validate_tenant_id(tenant), validate_task(task)
        missing: list[bool] = []

        def tx(pipe: redis.client.Pipeline) -> TenantRecord | None:
            cur = pipe.get(self._k_current(t, k))
            if cur is None:
                missing.append(True)
                return None
            cur_rec = TenantRecord.from_json(cur)
            hist = {int(v): raw for v, raw in pipe.hgetall(self._k_history(t, k)).items()}
            target = rollback_version(t, cur_rec.version, hist, to_version)
            new = TenantRecord.from_json(hist[target]).replace(status=cur_rec.status, updated_at=time.time())
            raw_policy = pipe.get(self._k_policy(t))
            policy = TenantPolicy() if raw_policy is None else TenantPolicy.from_json(raw_policy)
            pipe.multi()
            pipe.set(self._k_current(t, k), new.to_json())
            pipe.publish(self.channel, self._event(t, target, "rollback", k))
            if policy.split(k):
                self._write_policy(pipe, t, policy.with_split(k, ()))
            return new

        out = self._transact("rollback", tx, self._k_current(t, k), self._k_history(t, k), self._k_policy(t))
        if missing:
            raise self._not_found(t, k)
        return out

    def set_key_digest(self, tenant: str, digest: KeyDigest) -> None:
        """Store (or replace) the tenant's key digest atomically; publish "key". The tenant must have a
        current record (TenantNotFound otherwise), so a digest never outlives or precedes its tenant."""
        self._put_key_digest(tenant, digest, only_if_absent=False)

    def add_key_digest(self, tenant: str, digest: KeyDigest) -> bool:
        """Like set_key_digest, but only if the tenant has no digest yet; True if it was stored.
        (Two concurrent first onboardings then issue exactly one key.)"""
        return self._put_key_digest(tenant, digest, only_if_absent=True)

    def _put_key_digest(self, tenant: str, digest: KeyDigest, *, only_if_absent: bool) -> bool:
        t = validate_tenant_id(tenant)
        if not isinstance(digest, KeyDigest):
            raise TypeError(f"digest must be a KeyDigest, got {type(digest).__name__}")

        def tx(pipe: redis.client.Pipeline) -> bool:
            tasks = self._watch_lines(pipe, t)
            if not tasks:
                raise TenantNotFound(t)
            if only_if_absent and pipe.exists(self._k_key(t)):
                return False
            version = TenantRecord.from_json(pipe.get(self._k_current(t, tasks[0]))).version
            pipe.multi()
            pipe.set(self._k_key(t), digest.to_json())
            pipe.publish(self.channel, self._event(t, version, "key"))
            return True

        return self._transact("set_key_digest", tx, self._k_current(t), self._k_tasks(t), self._k_key(t))

    def remove(self, tenant: str, *, task: str | None = None) -> list[TenantRecord]:
        """`task=None`: delete the whole tenant, every task's current record and history and the key
        digest (not its version counter). A task: delete only that task's line; when it was the
        tenant's last task, the tenant goes as with None. Publishes "remove" (with the task, or
        null for the whole tenant). Returns the removed versions so the caller can delete their
        files from the store."""
        t = validate_tenant_id(tenant)
        k = None if task is None else validate_task(task)
        missing: list[bool] = []

        def tx(pipe: redis.client.Pipeline) -> list[TenantRecord]:
            tasks = self._watch_lines(pipe, t)
            hist_default = pipe.hvals(self._k_history(t))  # a default history without a current record
            if not tasks and not hist_default:
                raise TenantNotFound(t)
            if k is not None and k not in tasks:
                missing.append(True)
                return []
            whole = k is None or tasks == [k]
            gone = (list(dict.fromkeys([*tasks, DEFAULT_TASK])) if whole else [k])
            hists = [v for g in gone for v in pipe.hvals(self._k_history(t, g))]
            cur = pipe.get(self._k_current(t, k or (tasks[0] if tasks else DEFAULT_TASK)))
            version = TenantRecord.from_json(cur).version if cur else None
            raw_policy = None if whole else pipe.get(self._k_policy(t))
            policy = TenantPolicy() if raw_policy is None else TenantPolicy.from_json(raw_policy)
            pipe.multi()
            pipe.delete(*self._line_keys(t, gone))
            if not whole and k is not None and without_task(policy, k) != policy:
                self._write_policy(pipe, t, without_task(policy, k))  # the policy never names a removed task
            if whole:
                pipe.delete(self._k_key(t), self._k_tasks(t), self._k_policy(t))
                pipe.srem(self._k_tenants, t)
                pipe.zrem(self._k_pinned, t)
                pipe.zrem(self._k_usage, t)
            else:
                pipe.srem(self._k_tasks(t), k)
            pipe.publish(self.channel, self._event(t, version, "remove", None if whole else k))
            return sorted((TenantRecord.from_json(v) for v in hists), key=lambda r: r.version)

        out = self._transact("remove", tx, self._k_current(t), self._k_history(t), self._k_tasks(t), self._k_key(t),
                             self._k_policy(t))
        if missing:
            raise self._not_found(t, k)
        return out

    # ------------------------------------------------------------------ pinning and use counts
    def pin(self, tenant: str, max_pinned: int) -> bool:
        """Keep the tenant's current adapter (its default task's) resident on every worker; publish "pin". True if it was
        not pinned yet. Refuses (PinLimitReached) when `max_pinned` tenants are pinned already (the
        workers' `max_pinned_adapters`: a worker keeps no more), TenantNotFound without a record."""
        t = validate_tenant_id(tenant)

        def tx(pipe: redis.client.Pipeline) -> bool:
            cur = pipe.get(self._k_current(t))
            if cur is None:
                raise TenantNotFound(t)
            if pipe.zscore(self._k_pinned, t) is not None:
                return False
            pinned = [x.decode() for x in pipe.zrange(self._k_pinned, 0, -1)]
            if len(pinned) >= max_pinned:
                raise PinLimitReached(f"cannot pin {t!r}: {len(pinned)} tenant(s) are pinned already "
                                      f"({', '.join(pinned) or 'none'}) and max_pinned_adapters is {max_pinned}; "
                                      "unpin one first (tenantctl unpin TENANT) or raise max_pinned_adapters")
            pipe.multi()
            pipe.zadd(self._k_pinned, {t: time.time()})
            pipe.publish(self.channel, self._event(t, TenantRecord.from_json(cur).version, "pin"))
            return True

        return self._transact("pin", tx, self._k_current(t), self._k_pinned)

    def unpin(self, tenant: str) -> bool:
        """Let the tenant's adapter be evicted again; publish "unpin". True if it was pinned."""
        t = validate_tenant_id(tenant)

        def tx(pipe: redis.client.Pipeline) -> bool:
            if pipe.zscore(self._k_pinned, t) is None:
                return False
            pipe.multi()
            pipe.zrem(self._k_pinned, t)
            pipe.publish(self.channel, self._event(t, None, "unpin"))
            return True

        return self._transact("unpin", tx, self._k_pinned)

    def pinned(self) -> list[str]:
        """Pinned tenant ids, first pinned first."""
        with _redis_errors("pinned"):
            return [x.decode() for x in self._r.zrange(self._k_pinned, 0, -1)]

    def current_records(self, tenants: Iterable[str]) -> list[TenantRecord]:
        """The current records of these tenants in one round trip, in their order; tenants without
        a record are left out."""
        ids = [validate_tenant_id(t) for t in tenants]
        if not ids:
            return []
        with _redis_errors("current_records"):
            raws = self._r.mget([self._k_current(t) for t in ids])
        return [TenantRecord.from_json(raw) for raw in raws if raw is not None]

    def add_uses(self, counts: dict[str, int]) -> None:
        """Add requests served per tenant to the use counts (one pipelined round trip; workers)."""
        if not counts:
            return
        with _redis_errors("add_uses"):
            pipe = self._r.pipeline(transaction=False)
            for t, n in counts.items():
                pipe.zincrby(self._k_usage, int(n), validate_tenant_id(t))
            pipe.execute()

    def most_used(self, n: int) -> list[str]:
        """The `n` tenants with the highest use counts, most used first."""
        if n <= 0:
            return []
        with _redis_errors("most_used"):
            return [x.decode() for x in self._r.zrevrange(self._k_usage, 0, n - 1)]

    # ------------------------------------------------------------------ backup / restore (control plane)
    def snapshot(self, tenant: str) -> TenantSnapshot | None:
        """Current record, history, key digest and counter of the tenant, read in one MULTI/EXEC (a
        consistent view even while others write). None if the tenant has no current record."""
        t = validate_tenant_id(tenant)

        def tx(pipe: redis.client.Pipeline) -> TenantSnapshot | None:
            tasks = self._watch_lines(pipe, t)
            if not tasks:
                return None
            lines = [TaskLine(TenantRecord.from_json(pipe.get(self._k_current(t, k))),
                              tuple(sorted((TenantRecord.from_json(v) for v in pipe.hvals(self._k_history(t, k))),
                                           key=lambda r: r.version)))  # a hash has no order: oldest first
                     for k in tasks]
            key, seq = pipe.get(self._k_key(t)), pipe.get(self._k_seq(t))
            raw_policy = pipe.get(self._k_policy(t))
            default = lines[0] if tasks[0] == DEFAULT_TASK else None
            named = lines[1:] if default is not None else lines
            versions = [h.version for line in lines for h in line.history]
            pipe.multi()  # nothing to write: EXEC fails (and the read is retried) if a line changed meanwhile
            return TenantSnapshot(current=default.current if default else None,
                                  history=default.history if default else (), tasks=tuple(named),
                                  key_digest=None if key is None else KeyDigest.from_json(key),
                                  version_seq=max([int(seq or 0), *versions]),
                                  policy=None if raw_policy is None else TenantPolicy.from_json(raw_policy))

        return self._transact("snapshot", tx, self._k_current(t), self._k_tasks(t), self._k_key(t), self._k_seq(t),
                              self._k_policy(t))

    def tenant_ids(self) -> list[str]:
        """Ids of the tenants with a current record, sorted."""
        with _redis_errors("tenant_ids"):
            return sorted(x.decode() for x in self._r.smembers(self._k_tenants))

    def version_counters(self) -> dict[str, int]:
        """Every tenant's version counter, removed tenants included (their numbers stay used)."""
        head = f"{self.prefix}:version_seq:"
        with _redis_errors("version_counters"):
            names = [k.decode() for k in self._r.scan_iter(match=head + "*", count=1000)]
            values = self._r.mget(names) if names else []
        out = {}
        for name, v in zip(names, values):
            t = name[len(head):]
            if v is not None and is_valid_tenant_id(t):
                out[t] = int(v)
        return dict(sorted(out.items()))

    def exists(self, tenant: str) -> bool:
        """True if the tenant has a current record or a history (of any task)."""
        t = validate_tenant_id(tenant)
        with _redis_errors("exists"):
            return bool(self._r.exists(self._k_current(t), self._k_history(t), self._k_tasks(t)))

    def restore(self, snap: TenantSnapshot, *, replace: bool = False) -> None:
        """Write a snapshot as the tenant's whole state in one transaction; publish "import".

        Refuses (TenantExists) if the tenant has a record or history, unless `replace`, which drops its
        current record, history, key digest and policy first (the snapshot's policy, if any, is written). The version counter is never lowered (max of the
        existing and the snapshot's), so a version number is never handed out twice.
        """
        if not isinstance(snap, TenantSnapshot):
            raise TypeError(f"snap must be a TenantSnapshot, got {type(snap).__name__}")
        t = snap.tenant_id
        keys = (self._k_current(t), self._k_history(t), self._k_tasks(t), self._k_key(t), self._k_seq(t),
                self._k_policy(t))

        def tx(pipe: redis.client.Pipeline) -> None:
            if not replace and pipe.exists(self._k_current(t), self._k_history(t), self._k_tasks(t)):
                raise TenantExists(f"tenant {t!r} already exists (import with replace to overwrite it)")
            old = list(dict.fromkeys([*self._watch_lines(pipe, t), DEFAULT_TASK]))
            seq = max(int(pipe.get(self._k_seq(t)) or 0), snap.version_seq)
            pipe.multi()
            pipe.delete(*self._line_keys(t, old), self._k_tasks(t), self._k_key(t), self._k_policy(t))
            for line in snap.lines():
                task = line.current.task
                pipe.set(self._k_current(t, task), line.current.to_json())
                pipe.hset(self._k_history(t, task), mapping={str(h.version): h.to_json() for h in line.history})
                if task != DEFAULT_TASK:
                    pipe.sadd(self._k_tasks(t), task)
            if snap.key_digest is not None:
                pipe.set(self._k_key(t), snap.key_digest.to_json())
            if snap.policy is not None and snap.policy != TenantPolicy():
                pipe.set(self._k_policy(t), snap.policy.to_json())
            pipe.sadd(self._k_tenants, t)
            pipe.set(self._k_seq(t), seq)
            pipe.publish(self.channel, self._event(t, snap.lines()[0].current.version, "import"))

        self._transact("restore", tx, *keys)

    def raise_version_counter(self, tenant: str, value: int) -> int:
        """Set the tenant's version counter to max(current, value); return the result."""
        t = validate_tenant_id(tenant)

        def tx(pipe: redis.client.Pipeline) -> int:
            seq = max(int(pipe.get(self._k_seq(t)) or 0), int(value))
            pipe.multi()
            pipe.set(self._k_seq(t), seq)
            return seq

        return self._transact("raise_version_counter", tx, self._k_seq(t))

    def _transact(self, what: str, fn: Callable[[Any], Any], *watch: str) -> Any:
        with _redis_errors(what):
            return self._r.transaction(fn, *watch, value_from_callable=True)

    # ------------------------------------------------------------------ events (workers)
    def subscribe(self, callback: EventCallback, stop: threading.Event) -> threading.Thread:
        """Start a daemon thread that calls `callback(event)` for every event on `<prefix>:events`.

        The thread owns its own connection. When Redis drops it reconnects with exponential backoff
        (0.1 s doubling to 5 s, with jitter) and, after every successful re-subscription that followed
        a failure, calls `callback({"kind": "resync"})`: events may have been missed, so caches should
        be flushed or re-validated. Malformed messages are logged and skipped; exceptions raised by
        `callback` are logged and do not stop the thread. `callback` runs on this thread: keep it
        short and thread-safe. Set `stop` to end the thread (it notices within ~0.5 s).
        """
        th = threading.Thread(target=self._subscriber_loop, args=(callback, stop),
                              name=f"loraplex-events-{self.prefix}", daemon=True)
        th.start()
        return th

    def _subscriber_loop(self, callback: EventCallback, stop: threading.Event) -> None:
        backoff = BACKOFF_START_S
        failed = False
        while not stop.is_set():
            client = pubsub = None
            try:
                client = self._client(health_check_interval=SUBSCRIBER_HEALTH_CHECK_S)
                pubsub = client.pubsub()
                pubsub.subscribe(self.channel)
                # Wait for the server's confirmation so "subscribed" really means subscribed.
                deadline = time.monotonic() + self._timeouts[1]
                while True:
                    msg = pubsub.get_message(timeout=SUBSCRIBER_POLL_S)
                    if msg and msg.get("type") == "subscribe":
                        break
                    if time.monotonic() > deadline:
                        raise redis.TimeoutError("no subscribe confirmation")
                if failed:
                    _safe_call(callback, {"kind": "resync"})
                failed, backoff = False, BACKOFF_START_S
                while not stop.is_set():
                    msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=SUBSCRIBER_POLL_S)
                    if msg and msg.get("type") == "message":
                        event = _parse_event(msg.get("data"))
                        if event is not None:
                            _safe_call(callback, event)
            except (redis.RedisError, OSError) as e:
                if not failed:
                    log.warning("registry event subscription lost (%s); reconnecting", e)
                failed = True
                stop.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                for closable in (pubsub, client):
                    with contextlib.suppress(Exception):
                        if closable is not None:
                            closable.close()


def check_policy(tenant: str, policy: TenantPolicy, lines: "dict[str, set[int]]") -> None:
    """PolicyInvalid unless every task and version the policy names is one of the tenant's: `lines`
    maps each of its tasks to the versions in that task's history. The one rule for update_policy,
    snapshots and restores."""
    def known(task: str, where: str) -> set[int]:
        if task not in lines:
            raise PolicyInvalid(f"invalid tenant policy: {where}: tenant {tenant!r} has no task {task!r} "
                                f"(tasks: {', '.join(sorted(lines)) or 'none'})")
        return lines[task]

    for task, arms in policy.splits.items():
        versions = known(task, "split")
        missing = [a.version for a in arms if a.version not in versions]
        if missing:
            raise PolicyInvalid(f"invalid tenant policy: split of task {task!r}: no version "
                                f"{', '.join(f'v{v}' for v in missing)} in its history "
                                f"(known: {', '.join(f'v{v}' for v in sorted(versions))})")
    for link in policy.chain:
        if not link.base:
            versions = known(link.task, f"chain link {format_link(link)!r}")
            if link.version is not None and link.version not in versions:
                raise PolicyInvalid(f"invalid tenant policy: chain link {format_link(link)!r}: task {link.task!r} "
                                    f"has no version v{link.version}")
    for task in policy.examples:
        known(task, "examples")


def without_task(policy: TenantPolicy, task: str) -> TenantPolicy:
    """The policy once `task` is gone: its split and examples dropped, chain links to it dropped (a
    chain left with only the base link is no chain)."""
    chain = tuple(c for c in policy.chain if c.base or c.task != task)
    return policy.replace(splits={k: v for k, v in policy.splits.items() if k != task},
                          examples={k: v for k, v in policy.examples.items() if k != task},
                          chain=chain if any(not c.base for c in chain) else ())


def rollback_version(tenant: str, current: int, versions: Iterable[int], to_version: int | None) -> int:
    """The version a rollback makes current: `to_version` if it exists, else the newest one older
    than `current`. One rule for the registry's transaction and the CLI's pre-check."""
    known = sorted(set(versions))
    if to_version is None:
        older = [v for v in known if v < current]
        if not older:
            raise VersionNotFound(f"tenant {tenant!r} has no version older than v{current}")
        return older[-1]
    if to_version not in known:
        raise VersionNotFound(f"tenant {tenant!r} has no version v{to_version} "
                              f"(known: {', '.join(f'v{v}' for v in known)})")
    return to_version


def _parse_event(data: Any) -> dict[str, Any] | None:
    try:
        event = json.loads(data)
    except (TypeError, ValueError, UnicodeDecodeError):
        log.warning("ignoring malformed registry event %r", data[:200] if isinstance(data, (bytes, str)) else data)
        return None
    if not isinstance(event, dict) or event.get("kind") not in EVENT_KINDS:
        log.warning("ignoring registry event of unknown shape %r", str(event)[:200])
        return None
    return event


def _safe_call(callback: EventCallback, event: dict[str, Any]) -> None:
    try:
        callback(event)
    except Exception:  # a buggy callback must not kill the subscription
        log.exception("registry event callback failed for %r", event)
