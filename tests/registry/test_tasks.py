"""Tasks: a tenant's named adapter lines, each with its own versions, history and rollback (issue 14,
item 1), on real Redis: ids, records, onboarding, rollback, remove, status, events, backup/restore."""
from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from tenant_registry.backup import export_registry, import_registry
from tenant_registry.errors import (InvalidTaskName, InvalidTenantId, TaskNotFound, TenantNotFound,
                                    VersionNotFound)
from tenant_registry.ids import adapter_id, adapter_line, parse_adapter_id, parse_task_adapter_id, validate_task
from tenant_registry.onboarding import ensure_key, onboard
from tenant_registry.registry import TenantRegistry
from tenant_registry.schema import RecordError, TenantRecord

from .test_registry import _drain


# ---------------------------------------------------------------------------- ids
def test_task_names_and_adapter_ids():
    assert validate_task("summarize") == "summarize" and validate_task("a" * 32) == "a" * 32
    for bad in ["", "Sum", "a" * 33, "a:b", "a@v1", "../x", "-x", "sum\n", None, 3]:
        with pytest.raises(InvalidTaskName):
            validate_task(bad)
    assert issubclass(InvalidTaskName, ValueError)
    assert adapter_id("acme", 3) == "acme@v3" and adapter_id("acme", 3, "default") == "acme@v3"
    assert adapter_id("acme", 2, "summarize") == "acme:summarize@v2"
    assert adapter_line("acme", "summarize") == "acme:summarize" and adapter_line("acme") == "acme"
    assert parse_task_adapter_id("acme:summarize@v2") == ("acme", "summarize", 2)
    assert parse_task_adapter_id("acme@v3") == ("acme", "default", 3)
    for bad in ["acme:default@v3", "acme:@v1", "acme:Sum@v1", "acme:a:b@v1", "acme:s@v0"]:
        with pytest.raises(InvalidTenantId):
            parse_task_adapter_id(bad)
    with pytest.raises(InvalidTenantId):  # the old parser stays default-task only
        parse_adapter_id("acme:summarize@v2")


def _record(**over) -> dict:
    d = {"tenant_id": "acme", "adapter_id": "acme@v1", "version": 1, "path": "acme/v1", "sha256": "a" * 64,
         "rank": 8, "alpha": 16.0, "use_rslora": False, "target_modules": ["q_proj"], "base_model": "x",
         "status": "enabled", "created_at": 1.0, "updated_at": 1.0, "nbytes": 10}
    d.update(over)
    return d


def test_record_task_field():
    old = TenantRecord.from_dict(_record())  # a record written before tasks: no "task" field
    assert old.task == "default"
    assert "task" not in json.loads(old.to_json())  # default-task records are stored as before
    named = TenantRecord.from_dict(_record(task="summarize", adapter_id="acme:summarize@v1"))
    assert json.loads(named.to_json())["task"] == "summarize"
    assert TenantRecord.from_json(named.to_json()) == named
    with pytest.raises(RecordError, match="adapter_id"):
        TenantRecord.from_dict(_record(task="summarize"))  # id must name the task
    with pytest.raises(RecordError, match="task"):
        TenantRecord.from_dict(_record(task="Bad!", adapter_id="acme:Bad!@v1"))


# ---------------------------------------------------------------------------- onboarding, history, rollback
@pytest.fixture
def two_tasks(registry, store, base_spec, config, tiny_adapters):
    """acme: default v1 (a), summarize v2 (b), default v3 (c), summarize v4 (a)."""
    recs = [onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config),
            onboard(registry, store, base_spec, "acme", tiny_adapters["b"], config, task="summarize"),
            onboard(registry, store, base_spec, "acme", tiny_adapters["c"], config),
            onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config, task="summarize")]
    return recs


def test_onboard_two_tasks(registry, store, two_tasks):
    d1, s2, d3, s4 = two_tasks
    assert [r.adapter_id for r in two_tasks] == ["acme@v1", "acme:summarize@v2", "acme@v3", "acme:summarize@v4"]
    assert (s2.task, s2.path, d3.path) == ("summarize", "acme/v2", "acme/v3")  # one counter: own store dirs
    assert registry.get("acme") == d3 and registry.get("acme", task="summarize") == s4
    assert registry.tasks("acme") == ["default", "summarize"]
    assert [r.adapter_id for r in registry.history("acme")] == ["acme@v1", "acme@v3"]
    assert [r.adapter_id for r in registry.history("acme", task="summarize")] == ["acme:summarize@v2",
                                                                                   "acme:summarize@v4"]
    assert [r.adapter_id for r in registry.list()] == ["acme@v3", "acme:summarize@v4"]
    for r in two_tasks:
        assert store.verify(r)
    with pytest.raises(TaskNotFound, match="no task 'translate'"):
        registry.get("acme", task="translate")
    with pytest.raises(TaskNotFound):
        registry.history("acme", task="translate")
    with pytest.raises(TenantNotFound) as ei:
        registry.get("nobody", task="summarize")
    assert not isinstance(ei.value, TaskNotFound)
    with pytest.raises(InvalidTaskName):
        registry.get("acme", task="Bad")


def test_rollback_per_task(registry, two_tasks):
    back = registry.rollback("acme", task="summarize")
    assert back.adapter_id == "acme:summarize@v2" and registry.get("acme", task="summarize") == back.replace(
        updated_at=registry.get("acme", task="summarize").updated_at)
    assert registry.get("acme").adapter_id == "acme@v3"  # the default task did not move
    with pytest.raises(VersionNotFound):  # v3 is the default task's, not summarize's
        registry.rollback("acme", 3, task="summarize")
    assert registry.rollback("acme", 4, task="summarize").version == 4
    assert registry.rollback("acme").adapter_id == "acme@v1"
    assert registry.get("acme", task="summarize").version == 4
    with pytest.raises(TaskNotFound):
        registry.rollback("acme", task="translate")


def test_status_covers_every_task(registry, store, base_spec, config, tiny_adapters, two_tasks):
    registry.set_status("acme", "disabled")
    assert registry.get("acme").status == registry.get("acme", task="summarize").status == "disabled"
    new = onboard(registry, store, base_spec, "acme", tiny_adapters["b"], config, task="translate")
    assert new.status == "disabled" and registry.get("acme", task="translate").status == "disabled"
    registry.set_status("acme", "enabled")
    assert {r.status for r in registry.list()} == {"enabled"}


def test_a_tenant_with_only_a_named_task(registry, store, base_spec, config, tiny_adapters):
    rec = onboard(registry, store, base_spec, "solo", tiny_adapters["a"], config, task="qa")
    assert rec.adapter_id == "solo:qa@v1" and registry.tasks("solo") == ["qa"]
    assert ensure_key(registry, "solo") is not None  # a key needs a tenant, not a default task
    with pytest.raises(TaskNotFound):
        registry.get("solo")
    assert registry.set_status("solo", "disabled").status == "disabled"
    assert registry.exists("solo")


def test_remove_one_task_only(registry, store, two_tasks, tiny_adapters, raw_redis, prefix):
    ensure_key(registry, "acme")
    gone = registry.remove("acme", task="summarize")
    assert [r.adapter_id for r in gone] == ["acme:summarize@v2", "acme:summarize@v4"]
    assert registry.tasks("acme") == ["default"]
    assert registry.get("acme").adapter_id == "acme@v3" and registry.get_key_digest("acme") is not None
    with pytest.raises(TaskNotFound):
        registry.get("acme", task="summarize")
    with pytest.raises(TaskNotFound):
        registry.remove("acme", task="summarize")
    assert registry.next_version("acme") == 5  # numbers of the removed task are never reused
    # the last task removed takes the tenant with it
    assert [r.version for r in registry.remove("acme", task="default")] == [1, 3]
    assert not registry.exists("acme") and registry.tasks("acme") == []
    assert registry.get_key_digest("acme") is None
    assert not [k for k in raw_redis.scan_iter(match=f"{prefix}:*")
                if not k.decode().startswith(f"{prefix}:version_seq:")]


def test_remove_whole_tenant_takes_every_task(registry, two_tasks, raw_redis, prefix):
    gone = registry.remove("acme")
    assert [r.version for r in gone] == [1, 2, 3, 4]
    assert not registry.exists("acme")
    assert [k.decode() for k in raw_redis.scan_iter(match=f"{prefix}:*")] == [f"{prefix}:version_seq:acme"]


def test_events_carry_the_task(registry, store, base_spec, config, tiny_adapters):
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    registry.subscribe(q.put, stop)
    time.sleep(0.3)
    try:
        onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
        onboard(registry, store, base_spec, "acme", tiny_adapters["b"], config, task="summarize")
        onboard(registry, store, base_spec, "acme", tiny_adapters["c"], config, task="summarize")
        registry.rollback("acme", task="summarize")
        registry.set_status("acme", "disabled")
        registry.remove("acme", task="summarize")
        events = _drain(q, 6)
    finally:
        stop.set()
    assert [(e["kind"], e.get("task"), e["version"]) for e in events] == [
        ("onboard", "default", 1), ("onboard", "summarize", 2), ("onboard", "summarize", 3),
        ("rollback", "summarize", 2), ("disable", None, 1), ("remove", "summarize", 2)]


# ---------------------------------------------------------------------------- backup / restore
def test_backup_round_trip_keeps_tasks(registry, redis_url, prefix, store, base_spec, config, tiny_adapters,
                                       two_tasks):
    onboard(registry, store, base_spec, "solo", tiny_adapters["a"], config, task="qa")
    registry.rollback("acme", task="summarize")
    ensure_key(registry, "acme")
    doc = json.loads(json.dumps(export_registry(registry)))
    acme = next(e for e in doc["tenants"] if e["tenant_id"] == "acme")
    assert sorted(acme["tasks"]) == ["summarize"] and acme["current"]["adapter_id"] == "acme@v3"
    target = TenantRegistry(redis_url, prefix + "-restored")
    try:
        assert import_registry(target, doc) == 2
        for t in ("acme", "solo"):
            assert target.tasks(t) == registry.tasks(t)
            for task in registry.tasks(t):
                assert target.get(t, task=task) == registry.get(t, task=task)
                assert target.history(t, task=task) == registry.history(t, task=task)
        assert target.get_key_digest("acme") == registry.get_key_digest("acme")
        assert target.next_version("acme") == 5
        assert export_registry(target)["tenants"] == doc["tenants"]
        # restore with replace drops tasks the backup does not have
        onboard(target, store, base_spec, "acme", tiny_adapters["b"], config, task="extra")
        import_registry(target, doc, replace=True)
        assert target.tasks("acme") == ["default", "summarize"]
    finally:
        target.close()


def test_backup_without_tasks_is_unchanged_and_old_documents_load(registry, redis_url, prefix, store, base_spec,
                                                                  config, tiny_adapters):
    onboard(registry, store, base_spec, "acme", tiny_adapters["a"], config)
    doc = export_registry(registry)
    assert set(doc["tenants"][0]) == {"tenant_id", "current", "history", "key_digest"}
    assert "task" not in doc["tenants"][0]["current"]
    target = TenantRegistry(redis_url, prefix + "-old")
    try:
        assert import_registry(target, json.loads(json.dumps(doc))) == 1
        assert target.get("acme").task == "default" and target.tasks("acme") == ["default"]
    finally:
        target.close()
