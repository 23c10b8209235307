"""scripts/k8s/ checked without a cluster: core kinds against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), the InferencePool against its CRD's
openAPIV3Schema (tests/data/, copied from gateway-api-inference-extension), and the wiring
between them (labels, ports, the endpoint picker's engine entry naming handler/metrics.py's
metrics). The EndpointPickerConfig has no published schema: its field names are checked by
hand against llm-d-router's Go types (README "Kubernetes")."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

from handler import metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33"


def _docs() -> list[dict]:
    out = []
    for path in sorted((ROOT / "scripts" / "k8s").glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _one(kind: str, name: str) -> dict:
    found = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_core_kinds_match_the_kubernetes_schemas():
    core = [d for d in _docs() if d["kind"] != "InferencePool"]
    assert {d["kind"] for d in core} >= {"Deployment", "Service", "ConfigMap"}
    for doc in core:
        kv.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError naming the field


def test_a_bad_manifest_is_refused():
    bad = json.loads(json.dumps(_one("Deployment", "loraplex")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exex"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_inference_pool_matches_its_crd_schema():
    schema = json.loads((ROOT / "tests" / "data" / "inferencepool_v1_schema.json").read_text())
    pool = _one("InferencePool", "loraplex")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    jsonschema.validate(pool, schema)
    broken = {**pool, "spec": {k: v for k, v in pool["spec"].items() if k != "targetPorts"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_the_pool_selects_the_pods_and_the_picker_reads_loraplex_metrics():
    pod = _one("Deployment", "loraplex")["spec"]["template"]
    pool = _one("InferencePool", "loraplex")["spec"]
    labels = pod["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["containerPort"]: c for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert pool["targetPorts"][0]["number"] in ports
    epp_service = _one("Service", pool["endpointPickerRef"]["name"])
    assert pool["endpointPickerRef"]["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]

    config = yaml.safe_load(_one("ConfigMap", "loraplex-epp")["data"]["epp-config.yaml"])
    plugins = {p["type"]: p.get("parameters", {}) for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]
    engine = next(e for e in extractor["engineConfigs"] if e["name"] == labels[extractor["engineLabelKey"]])
    assert engine == {"name": engine["name"], "queuedRequestsSpec": metrics.WAITING.name,
                      "runningRequestsSpec": metrics.RUNNING.name, "kvUsageSpec": metrics.KV_CACHE.name,
                      "loraSpec": metrics.LORA_INFO.name}
    assert {metrics.WAITING, metrics.RUNNING, metrics.KV_CACHE, metrics.LORA_INFO} <= set(metrics.EPP_METRICS)
    torchserve = next(c for c in pod["spec"]["containers"] if c["name"] == "torchserve")
    env = {e["name"]: e.get("value") for e in torchserve["env"]}
    assert int(env["LORAPLEX_EPP_METRICS_ADDRESS"].rsplit(":", 1)[1]) == plugins["metrics-data-source"]["port"]
    assert plugins["metrics-data-source"]["port"] in ports
    used = {p["pluginRef"] for prof in config["schedulingProfiles"] for p in prof["plugins"]}
    used |= {s["pluginRef"] for s in config["dataLayer"]["sources"]}
    assert used <= set(plugins) and "lora-affinity-scorer" in used


def test_torchserve_config_keeps_token_auth_and_metrics():
    props = _one("ConfigMap", "loraplex-config")["data"]["config.properties"]
    keys = dict(line.split("=", 1) for line in props.splitlines() if line and not line.startswith("#"))
    assert "disable_token_authorization" not in keys and keys["metrics_mode"] == "prometheus"
    assert keys["inference_address"].startswith("http://127.0.0.1:")  # only the token proxy reaches it
