"""The end-to-end stack shared by every file in tests/e2e: one real `torchserve`
(Java frontend + Python worker running our handler) serving an archive built
from the session's tiny random Llama, on the session's private `redis-server`,
with TorchServe's token auth on. Session-scoped: TorchServe starts once.

Tests reach it through the `stack` fixture (an `E2EStack`): `stack.tenantctl(...)`
runs the real CLI, `stack.ask(...)` posts to /predictions/loraplex with the
inference token, `stack.expected(...)` is PEFT's greedy text (the oracle).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from loraplex_testing.archive import build_archive, with_batching
from loraplex_testing.oracle import reference_generate
from loraplex_testing.services import TorchServe, free_ports

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class E2EStack:
    ts: TorchServe
    tmp: Path
    redis_url: str
    store: Path
    model: Path
    prefix: str = "e2e"
    new_tokens: int = 8

    def tenantctl(self, *args: str) -> subprocess.CompletedProcess:
        """The real `tenantctl --json ...` against this stack's registry, store, model and TorchServe."""
        exe = Path(sys.executable).parent / "tenantctl"
        base = [str(exe), "--json", "--model-config", str(self.tmp / "model-config.yaml"), "--redis-url", self.redis_url, "--store", str(self.store),
                "--base-model-dir", str(self.model), "--management-url", self.ts.management_url,
                "--key-file", str(self.ts.workdir / "key_file.json")]
        return subprocess.run(base + list(args), capture_output=True, text=True, timeout=120,
                              env={"LORAPLEX_REDIS_PREFIX": self.prefix, "PATH": "/usr/bin:/bin"})

    def ask(self, tenant: str | None, body: dict | bytes, *, headers: dict[str, str] | None = None,
            timeout: float = 120) -> requests.Response:
        """POST /predictions/loraplex with the inference token (dict body -> JSON, bytes -> raw)."""
        sent = {"Authorization": f"Bearer {self.ts.keys()['inference']['key']}"}
        if tenant is not None:
            sent["X-Tenant-ID"] = tenant
        sent.update(headers or {})
        url = f"{self.ts.inference_url}/predictions/loraplex"
        if isinstance(body, dict):
            return requests.post(url, json=body, headers=sent, timeout=timeout)
        return requests.post(url, data=body, headers={"Content-Type": "application/json", **sent}, timeout=timeout)

    def expected(self, adapter_dir: Path | None, prompt: str) -> str:
        """PEFT's greedy text for `new_tokens` NEW tokens (adapter_dir None = the base model)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.model))
        ids = tok(prompt)["input_ids"]
        out = reference_generate(self.model, adapter_dir, ids, self.new_tokens)
        return tok.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="session")
def stack(tiny_model_dir, redis_url, tmp_path_factory) -> E2EStack:
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = yaml.safe_load((ROOT / "model-config.yaml").read_text())
    cfg = with_batching(cfg, 4, 200)  # TorchServe batches only a synchronous (static) worker
    cfg["handler"].update({"num_slots": 4, "base_model_name": "", "max_new_tokens_cap": 32,
                           "idle_ttl_s": 600, "registry_cache_s": 30})
    (tmp / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    build_archive(tiny_model_dir, tmp / "model_store", config_file=tmp / "model-config.yaml")
    prefix = "e2e"
    env = {"LORAPLEX_REDIS_URL": redis_url, "LORAPLEX_ADAPTER_STORE": str(tmp / "adapters"),
           "LORAPLEX_REDIS_PREFIX": prefix,
           "LORAPLEX_EPP_METRICS_ADDRESS": f"127.0.0.1:{free_ports(1)[0]}"}  # the LoRA gauge (test_metrics_endpoint.py)
    ts = TorchServe(tmp / "ts", tmp / "model_store", env=env)
    try:
        ts.start(timeout=240)
        yield E2EStack(ts=ts, tmp=tmp, redis_url=redis_url, store=tmp / "adapters", model=tiny_model_dir,
                       prefix=prefix)
    finally:
        ts.stop()  # also when start() failed half way
