"""handler/metrics.py without TorchServe: the label cap, the label values TorchServe's frontend
can carry, the LoRA gauge's form, and the shipped ts_metrics.yaml declaring every metric."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from handler import metrics
from handler.metrics import EMPTY_LIST, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]


class ListSink:
    def __init__(self):
        self.seen = []

    def record(self, metric, value, labels):
        self.seen.append((metric.name, value, tuple(labels)))


def test_adapters_beyond_the_cap_share_the_other_labels():
    sink = ListSink()
    m = WorkerMetrics([sink], max_adapters=2)
    for tenant in ("a", "b", "c", "a"):
        m.served(tenant, 1, tokens=4, engine_s=0.4, reply_s=0.5)
    tenants = [labels[0] for name, _, labels in sink.seen if name == metrics.REQUESTS.name]
    assert tenants == ["a", "b", "_other", "a"]
    itl = [v for name, v, _ in sink.seen if name == metrics.ITL_SECONDS.name]
    assert itl == pytest.approx([0.1] * 4)


def test_label_values_survive_torchserves_line_format():
    """No "," ":" "|" and never empty (the frontend drops such a label)."""
    sink = ListSink()
    m = WorkerMetrics([sink], max_adapters=10, max_lora=2)
    m.served(None, None, tokens=0, engine_s=0.1, reply_s=0.1)
    m.fallback(None, None, "unknown_tenant")
    m.loaded("acme", 3, "host", 0.01)
    m.evicted("acme", 3, "lru")
    m.loaded("acme", 4, "store", 0.01, task="summarize")  # a task's name is the task label
    m.wave(2, 1, [], [])
    m.tiers(1, 0)
    for name, _, labels in sink.seen:
        if name == metrics.LORA_INFO.name:
            continue
        assert all(v and not set(v) & set(",:|") for v in labels), (name, labels)
    assert ("loraplex_adapter_loads_total", 1, ("acme", "none", "v3", "host")) in sink.seen
    assert ("loraplex_adapter_loads_total", 1, ("acme", "summarize", "v4", "store")) in sink.seen
    assert not [s for s in sink.seen if s[0] == metrics.ITL_SECONDS.name]  # no tokens: no inter-token time


def test_lora_gauge_lists_running_and_waiting_adapters_with_the_time():
    sink = ListSink()
    m = WorkerMetrics([sink], max_lora=2, wall_clock=lambda: 1234.5)
    m.wave(3, 1, ["a", "b", "a"], ["c"])
    m.wave(0, 0, ["a"], [])
    info = [(v, labels) for name, v, labels in sink.seen if name == metrics.LORA_INFO.name]
    assert info == [(1234.5, ("2", "a,b", "c")), (1234.5, ("2", "a", EMPTY_LIST))]


def test_shipped_ts_metrics_yaml_declares_every_metric():
    shipped = yaml.safe_load((ROOT / "ts_metrics.yaml").read_text())["model_metrics"]
    for kind, items in metrics.metrics_yaml().items():
        for item in items:
            assert item in shipped[kind], item
    assert metrics.LORA_INFO not in metrics.TS_METRICS  # its labels cannot pass TorchServe (module doc)
    props = (ROOT / "config.properties").read_text()
    assert "metrics_mode=prometheus" in props and "metrics_config=ts_metrics.yaml" in props


def test_epp_endpoint_keeps_the_newest_lora_series():
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from loraplex_testing.services import free_ports

    endpoint = metrics.EppEndpoint(f"127.0.0.1:{free_ports(1)[0]}")
    try:
        m = WorkerMetrics([endpoint], max_lora=2, wall_clock=iter(range(100, 200)).__next__)
        for i in range(endpoint.LORA_INFO_SERIES + 3):
            m.wave(1, 0, [f"t{i}"], [])
        m.wave(2, 1, ["a", "b"], ["c"])
        text = prometheus_client.generate_latest(endpoint.registry).decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        info = fams[metrics.LORA_INFO.name].samples
        assert len(info) == endpoint.LORA_INFO_SERIES
        latest = max(info, key=lambda s: s.value)
        assert latest.labels == {"max_lora": "2", "running_lora_adapters": "a,b", "waiting_lora_adapters": "c"}
        assert fams[metrics.RUNNING.name].samples[0].value == 2
        assert any(s.labels["waiting_lora_adapters"] == "" for s in info)
    finally:
        endpoint.close()
