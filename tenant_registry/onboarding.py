"""Onboarding: validate -> copy into the store -> write the record, all or nothing.

Order and why:
  1. validate the tenant id and the adapter (reads only: a refusal writes nothing anywhere);
  2. reserve a version number in Redis (a counter; a failed onboarding leaves a harmless gap);
  3. copy the two files into the store, bytes re-hashed against step 1 (a local store: staged +
     atomic rename; an s3:// store, which has no rename: both objects under the new version's key,
     read back and re-hashed, `tenant_registry/s3_store.py`);
  4. write the record + history + event in one Redis transaction: the commit point. Workers read only
     versions a record names, so a version's files are invisible to them until this step.
A failure after step 3 removes the copied version (directory or objects), so there is never a record
without files nor files without a record.

Tasks: `task` names the tenant's adapter line the new version joins (`default` unless given); a new
task takes the status the tenant's other tasks have. Version numbers come from one counter per tenant,
shared by its tasks, so the store's `<tenant>/v<N>` directories never collide across tasks.

A tenant that is currently disabled stays disabled when a new version is onboarded (onboarding is
not a way around a disable); `tenantctl enable` re-enables it.

Tenant keys are issued separately from `onboard` (which returns the TenantRecord other code
relies on): the CLI calls `ensure_key` after a successful onboarding, which issues a key only if the
tenant has none yet, and `rotate_key` on demand. Both return the plain key exactly once; only its
salted digest is stored. A crash between `onboard` and `ensure_key` leaves a tenant without a key,
which the next onboarding (or `tenantctl rotate-key`) fixes.

Backup and restore of the whole registry live in `backup.py`.

Called from the CLI process (one thread). Not for workers.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

from loraplex_common.config import LoraplexConfig
from .errors import PolicyInvalid, TenantNotFound
from .ids import DEFAULT_TASK, adapter_id, validate_task, validate_tenant_id
from .keys import digest_key, generate_key
from .quotas import enforce as enforce_quotas
from .registry import TenantRegistry
from .schema import TenantPolicy, TenantRecord
from .store import AdapterStore
from .validate import AdapterManifest, BaseModelSpec, validate_adapter


def onboard(registry: TenantRegistry, store: AdapterStore, spec: BaseModelSpec, tenant_id: str,
            src_dir: str | os.PathLike, config: LoraplexConfig, *, task: str = DEFAULT_TASK) -> TenantRecord:
    """Register the adapter in `src_dir` as the next version of the tenant's `task` and return the
    new record.

    Raises InvalidTenantId, InvalidTaskName, AdapterInvalid (nothing written), QuotaExceeded (the
    tenant's quotas, tenant_registry/quotas.py; nothing written), RegistryUnavailable, VersionConflict.
    """
    tenant = validate_tenant_id(tenant_id)
    task = validate_task(task)
    manifest = validate_adapter(src_dir, spec, max_rank=config.max_rank, max_bytes=config.max_adapter_bytes,
                                base_model_name=config.base_model_name, allowed_targets=config.target_modules)
    enforce_quotas(registry, config, tenant, task, manifest.nbytes)  # QuotaExceeded: nothing written
    try:
        status = registry.get(tenant, task=task).status  # a new task: put_new_version copies the others' status
    except TenantNotFound:
        status = "enabled"
    version = registry.next_version(tenant)
    rel = store.install(tenant, version, src_dir, manifest)
    try:
        record = _record(tenant, task, version, rel, manifest, status)
        return registry.put_new_version(record)
    except BaseException:
        store.remove_version(tenant, version)
        raise


def _record(tenant: str, task: str, version: int, rel: str, m: AdapterManifest, status: str) -> TenantRecord:
    now = time.time()
    return TenantRecord(
        tenant_id=tenant, task=task, adapter_id=adapter_id(tenant, version, task), version=version, path=rel, sha256=m.sha256,
        rank=m.rank, alpha=m.alpha, use_rslora=m.use_rslora, target_modules=m.target_modules,
        base_model=m.base_model, status=status, created_at=now, updated_at=now, nbytes=m.nbytes)


def ensure_key(registry: TenantRegistry, tenant: str) -> str | None:
    """Issue the tenant's first key if it has none; return the new key, or None if it already had one.

    The key is returned only here and never stored (only its digest is). Raises TenantNotFound if the
    tenant has no record, RegistryUnavailable.
    """
    t = validate_tenant_id(tenant)
    if registry.get_key_digest(t) is not None:
        return None
    key = generate_key()
    return key if registry.add_key_digest(t, digest_key(key)) else None


def rotate_key(registry: TenantRegistry, tenant: str) -> str:
    """Issue a new key for the tenant, replacing its digest (the old key stops working); return it.
    Raises TenantNotFound, RegistryUnavailable."""
    t = validate_tenant_id(tenant)
    key = generate_key()
    registry.set_key_digest(t, digest_key(key))
    return key


# ---------------------------------------------------------------------------- task router policy
def parse_examples(text: str) -> tuple[str, ...]:
    """A task's example prompts for the task router (`router: classify`) as an operator writes them
    (`tenantctl ... --examples FILE`, the HTTP API's `examples`): a JSON list of strings, or one
    prompt per line (blank lines skipped). PolicyInvalid when there is none or one is not a string;
    the policy's own limits (count, length) are checked when it is written."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            doc = json.loads(stripped)
        except ValueError as e:
            raise PolicyInvalid(f"examples: not a valid JSON list: {e}") from None
        if not isinstance(doc, list) or not all(isinstance(x, str) for x in doc):
            raise PolicyInvalid("examples: a JSON list of strings, or one prompt per line")
        prompts = [x.strip() for x in doc]
    else:
        prompts = [line.strip() for line in stripped.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PolicyInvalid("examples: no prompt given (a JSON list of strings, or one prompt per line)")
    return tuple(prompts)


def with_examples(task: str, examples: tuple[str, ...]) -> Callable[[TenantPolicy], TenantPolicy]:
    """`registry.update_policy` change: the task's example prompts set (() removes them)."""
    task = validate_task(task)
    TenantPolicy(examples={task: examples})  # the policy's own limits, checked before anything is written
    return lambda p: p.replace(examples={**p.examples, task: examples})


def with_router(router: str) -> Callable[[TenantPolicy], TenantPolicy]:
    """`registry.update_policy` change: the tenant's router ("header" | "classify")."""
    TenantPolicy(router=router)
    return lambda p: p.replace(router=router)


WORKER_POLICY = "worker"  # `tenantctl router --unknown-task worker`: the tenant follows the worker's config


def with_unknown_task(value: str) -> Callable[[TenantPolicy], TenantPolicy]:
    """`registry.update_policy` change: what serves a request naming a task the tenant lacks
    ("reject" | "default"; "worker" = the worker's `unknown_task_policy`)."""
    stored = None if value == WORKER_POLICY else value
    TenantPolicy(unknown_task=stored)
    return lambda p: p.replace(unknown_task=stored)


def router_change(router: str | None, task: str | None = None, examples: tuple[str, ...] | None = None,
                  unknown_task: str | None = None) -> Callable[[TenantPolicy], TenantPolicy]:
    """One `registry.update_policy` change for `tenantctl router` and the HTTP API: the router,
    one task's examples and/or the unknown-task rule (checked now, before anything is written)."""
    changes = ([with_router(router)] if router is not None else []) + (
        [with_examples(task, examples)] if task is not None and examples is not None else []) + (
        [with_unknown_task(unknown_task)] if unknown_task is not None else [])

    def change(policy: TenantPolicy) -> TenantPolicy:
        for one in changes:
            policy = one(policy)
        return policy
    return change


def router_doc(tenant: str, policy: TenantPolicy) -> dict:
    """What `tenantctl router` and the HTTP API show of a tenant's routing."""
    return {"tenant": tenant, "router": policy.router, "examples": {t: list(x) for t, x in policy.examples.items()},
            "unknown_task": policy.unknown_task or WORKER_POLICY}
