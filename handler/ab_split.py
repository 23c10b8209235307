"""Which version of a task serves a request: a pinned `@vN` > the task's A/B split > the current version.

The split is the tenant's policy (`TenantPolicy.splits`, set by `tenantctl split` or the onboarding
API's `/tenants/<t>/split`): per task, weighted arms (version, weight). A request with X-User-ID is
sticky: `sha256(f"{tenant}:{task}:{user_id}")` (its first 8 bytes, big-endian) modulo the arms' total
weight picks the arm, so the same user of the same tenant and task gets the same version on every
worker for as long as the split is unchanged. The weights are first divided by their greatest common
divisor, so 90/10 and 9/1 are the same split for every user. A change that keeps that reduced total
(90/10 -> 80/20: 9/1 -> 8/2, both 10) moves only the users whose point falls in a range that changed
hands; one that changes it (90/10 -> 85/15: 20) deals every user again. Without X-User-ID the point is
`random.random() * total`.

Ending a split (`--clear`), changing it, or rolling the task back (which ends its split) is one
registry write with one "policy" event; every worker's resolver drops its cached policy on that
event, so the next request everywhere uses the new policy.

An arm whose version is no longer in the task's history (the registry refuses such a split when it
is set, so only a restore from an older backup or a stale cache can lead here) is not an error for
the request: the current version serves it (`version_by: "split_missing"`) and the counter
`missing` of that task counts it.

The chosen version is served exactly like a pinned one: its record from the task's history, with the
tenant's live status (`LoraplexService._explicit_version`), planned before the request reaches either
scheduler.

Concurrency: `choose` runs on whichever thread plans the request (the async entry's pool or the
request thread); `served` runs where replies are built (the request thread or the scheduler thread);
`snapshot` on any thread. One lock guards the counters.
"""
from __future__ import annotations

import hashlib
import math
import random
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from tenant_registry.schema import SplitArm, TenantPolicy, TenantRecord

# Plan.version_by values: why this version serves the request.
PINNED = "pinned"              # the request named "<tenant>[:<task>]@v<N>"
SPLIT = "split"                # the task's A/B split chose it
SPLIT_MISSING = "split_missing"  # the split chose a version gone from the history: the current one serves
CURRENT = "current"            # the task's current version (no split)
MISSING = "missing"            # the counter of SPLIT_MISSING requests, next to the "v<N>" ones


def split_point(tenant: str, task: str, user_id: str, total: int) -> int:
    """The user's sticky point in [0, total): the one hash of stickiness."""
    digest = hashlib.sha256(f"{tenant}:{task}:{user_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % total


def pick_arm(arms: Sequence[SplitArm], tenant: str, task: str, user_id: str | None,
             rand: Callable[[], float] = random.random) -> SplitArm:
    """The arm whose weight range [start, start + weight) holds the request's point (weights reduced
    by their gcd: relative weights, one split)."""
    unit = math.gcd(*(a.weight for a in arms))
    weights = [a.weight // unit for a in arms]
    total = sum(weights)
    point = split_point(tenant, task, user_id, total) if user_id is not None else min(int(rand() * total), total - 1)
    for arm, weight in zip(arms, weights):
        if point < weight:
            return arm
        point -= weight
    raise AssertionError("a point below the total weight falls in some arm")  # pragma: no cover


@dataclass(frozen=True)
class VersionChoice:
    record: TenantRecord  # the version that serves the request
    by: str               # SPLIT, SPLIT_MISSING or CURRENT


class SplitChooser:
    """The split step of the planning, and the per-version counters `describe()["splits"]` shows."""

    def __init__(self, rand: Callable[[], float] = random.random) -> None:
        self._rand = rand
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, dict[str, int]]] = {}  # tenant -> task -> "v<N>" | "missing" -> n

    def choose(self, policy: TenantPolicy, current: TenantRecord, user_id: str | None,
               version: Callable[[int], TenantRecord | None]) -> VersionChoice:
        """The version of `current`'s task that serves a request which pinned none. `version(n)` looks
        a version of that task up in its history (None when it is not there)."""
        arms = policy.split(current.task)
        if not arms:
            return VersionChoice(current, CURRENT)
        arm = pick_arm(arms, current.tenant_id, current.task, user_id, self._rand)
        if arm.version == current.version:
            return VersionChoice(current, SPLIT)
        record = version(arm.version)
        if record is None:
            return VersionChoice(current, SPLIT_MISSING)
        return VersionChoice(record, SPLIT)

    def served(self, record: TenantRecord, by: str | None) -> None:
        """Count one answered request that the split placed (SPLIT: under its version; SPLIT_MISSING:
        under `missing`); other requests are not counted here."""
        if by not in (SPLIT, SPLIT_MISSING):
            return
        key = f"v{record.version}" if by == SPLIT else MISSING
        with self._lock:
            task_counts = self._counts.setdefault(record.tenant_id, {}).setdefault(record.task, {})
            task_counts[key] = task_counts.get(key, 0) + 1

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        """tenant -> task -> {"v3": n, "v4": m[, "missing": k]}: requests this worker answered by split."""
        with self._lock:
            return {t: {k: dict(sorted(c.items())) for k, c in tasks.items()} for t, tasks in self._counts.items()}
