"""Prometheus metrics of a real TorchServe (the shared `stack`): TorchServe's metrics endpoint
(`metrics_address`, metrics_mode=prometheus) carries loraplex's per-adapter and per-worker
series; the worker's own endpoint (`epp_metrics_address`) carries the endpoint picker's LoRA
gauge. Both are parsed with prometheus_client's text parser; counts are compared with what was
sent. The stack keeps 2 adapters resident (num_slots 4), so of 3 tenants asking at once one waits."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

parser = pytest.importorskip("prometheus_client.parser")

from handler.metrics import LORA_INFO, TS_METRICS  # noqa: E402

pytestmark = pytest.mark.e2e

TENANTS = ("met-a", "met-b", "met-c")
PROMPT = "hello world"


def _scrape(url: str) -> dict:
    text = requests.get(url, timeout=30).text
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def _ts_metrics(stack) -> dict:
    return _scrape(f"http://127.0.0.1:{stack.ts.ports[2]}/metrics")


def _epp_metrics(stack) -> dict:
    return _scrape(f"http://{stack.ts.env['LORAPLEX_EPP_METRICS_ADDRESS']}/metrics")


def _value(families: dict, family: str, sample: str, **labels) -> float:
    """Sum of the samples named `sample` whose labels include `labels` (0 if none)."""
    fam = families.get(family)
    return sum(s.value for s in (fam.samples if fam else ())
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def _ask(stack, tenant: str, max_new_tokens: int = 4) -> dict:
    r = stack.ask(tenant, {"prompt": PROMPT, "max_new_tokens": max_new_tokens})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def served(stack, tiny_adapters):
    for tenant, adapter in zip(TENANTS, ("a", "b", "c")):
        done = stack.tenantctl("onboard", tenant, str(tiny_adapters[adapter]))
        assert done.returncode == 0, done.stderr
    sent = {t: 0 for t in TENANTS}
    tokens = {t: 0 for t in TENANTS}

    def ask(tenant, max_new_tokens=4):
        body = _ask(stack, tenant, max_new_tokens)
        assert body["adapter"] == f"{tenant}@v1" and body["fallback"] is None, body
        sent[tenant] += 1
        tokens[tenant] += body["usage"]["completion_tokens"]

    for tenant in ("met-a", "met-a", "met-b"):
        ask(tenant)
    one_waiting = None
    for _ in range(5):  # 3 tenants at once on 2 slots: one waits (static: a second wave of the
        with ThreadPoolExecutor(3) as pool:  # frontend's batch; continuous: its adapter cannot load
            list(pool.map(ask, TENANTS, [32] * 3))  # while both slots are held by running rows)
        info = _epp_metrics(stack)[LORA_INFO.name]
        # a series of these tenants with both slots' adapters running and the third waiting (other
        # series: an adapter waiting for its store read before the others arrived, idle ones, or
        # other tests' tenants on the shared server)
        one_waiting = next((s for s in info.samples if s.labels["waiting_lora_adapters"]
                            and len(s.labels["running_lora_adapters"].split(",")) == 2
                            and {*s.labels["running_lora_adapters"].split(","),
                                 *s.labels["waiting_lora_adapters"].split(",")} <= set(TENANTS)), None)
        if one_waiting is not None:
            break
    before = _ts_metrics(stack)
    r = stack.ask(None, {"prompt": PROMPT, "max_new_tokens": 2})  # no tenant: the base model, flagged
    assert r.status_code == 200 and r.json()["fallback"] == "no_tenant", r.text
    no_tenant = {"tenant": "_none", "version": "_base", "reason": "no_tenant"}
    fallbacks = (_value(_ts_metrics(stack), "loraplex_adapter_fallbacks", "loraplex_adapter_fallbacks_total", **no_tenant)
                 - _value(before, "loraplex_adapter_fallbacks", "loraplex_adapter_fallbacks_total", **no_tenant))
    return {"sent": sent, "tokens": tokens, "one_waiting": one_waiting, "no_tenant_fallbacks": fallbacks}


def test_every_loraplex_series_parses_with_its_declared_labels(stack, served):
    families = _ts_metrics(stack)
    for m in TS_METRICS:
        assert m.name in families or m.name.removesuffix("_total") in families, (m.name, sorted(families))
        fam = families.get(m.name) or families[m.name.removesuffix("_total")]
        assert fam.samples, m.name
        for sample in fam.samples:
            assert set(m.labels) <= set(sample.labels), (m.name, sample.labels)
            assert all(v and "," not in v for v in sample.labels.values()), sample


def test_per_adapter_counts_equal_what_was_sent(stack, served):
    families = _ts_metrics(stack)
    for tenant in TENANTS:
        labels = {"tenant": tenant, "version": "v1", "task": "default"}  # the record's task
        assert _value(families, "loraplex_adapter_requests", "loraplex_adapter_requests_total",
                      **labels) == served["sent"][tenant]
        assert _value(families, "loraplex_adapter_generated_tokens", "loraplex_adapter_generated_tokens_total",
                      **labels) == served["tokens"][tenant]
        for hist in ("loraplex_adapter_time_to_first_token_seconds", "loraplex_adapter_inter_token_latency_seconds"):
            assert _value(families, hist, f"{hist}_count", **labels) == served["sent"][tenant], hist
        loads = _value(families, "loraplex_adapter_loads", "loraplex_adapter_loads_total", **labels)
        assert loads >= 1
        assert _value(families, "loraplex_adapter_load_seconds", "loraplex_adapter_load_seconds_count",
                      **labels) == loads
        assert _value(families, "loraplex_adapter_load_seconds", "loraplex_adapter_load_seconds_sum", **labels) > 0
    assert served["no_tenant_fallbacks"] == 1
    # 3 tenants on 2 resident slots: someone was evicted, by LRU
    assert sum(_value(families, "loraplex_adapter_evictions", "loraplex_adapter_evictions_total", tenant=t,
                      reason="lru") for t in TENANTS) >= 1


def test_worker_gauges(stack, served):
    families = _ts_metrics(stack)
    describe = stack.ts.describe()[0]["customizedMetadata"]
    describe = json.loads(describe) if isinstance(describe, str) else describe
    assert _value(families, "loraplex_resident_adapters", "loraplex_resident_adapters") == len(describe["resident"])
    assert _value(families, "loraplex_num_requests_running", "loraplex_num_requests_running") == 0  # between batches
    assert _value(families, "loraplex_num_requests_waiting", "loraplex_num_requests_waiting") == 0
    assert _value(families, "loraplex_kv_cache_usage_perc", "loraplex_kv_cache_usage_perc") == 0


def test_lora_gauge_names_the_running_and_waiting_adapters(stack, served):
    wave = served["one_waiting"]
    assert wave is not None, "no sample had a waiting adapter while 3 tenants asked at once"
    running = set(wave.labels["running_lora_adapters"].split(","))
    waiting = set(wave.labels["waiting_lora_adapters"].split(","))
    assert wave.labels["max_lora"] == "2" and len(running) == 2 and len(waiting) == 1
    assert running | waiting == set(TENANTS)
    # the newest series (the picker takes the largest value): idle, the resident adapters
    info = _epp_metrics(stack)[LORA_INFO.name]
    latest = max(info.samples, key=lambda s: s.value)
    assert abs(latest.value - time.time()) < 120
    describe = stack.ts.describe()[0]["customizedMetadata"]
    describe = json.loads(describe) if isinstance(describe, str) else describe
    resident = {r["adapter"].split("@")[0] if isinstance(r, dict) else r.split("@")[0] for r in describe["resident"]}
    assert set(latest.labels["running_lora_adapters"].split(",")) == resident
    assert latest.labels["waiting_lora_adapters"] == ""
