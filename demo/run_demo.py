"""The loraplex demo: a real redis-server and torchserve on 127.0.0.1, three
tenants onboarded with `tenantctl` (no restart), and the same questions asked
as each tenant, as an unknown tenant and with `adapter: "base"`, printed side
by side, followed by `tenantctl status` (which worker holds which adapter).

Run through `make demo` (which converts the base model, trains the demo
adapters once and builds the archive first). Stop everything with `make stop`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from loraplex_testing.services import DEMO_REDIS_PORT, start_demo_stack

ROOT = Path(__file__).resolve().parent.parent

VAR = ROOT / "var"
TENANTS = ("pirate", "shouty", "robot")
QUESTIONS = ("What is the capital of France?", "Give me a tip for staying healthy.")
INFERENCE = "http://127.0.0.1:8080"


def tenantctl(base_model: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "tenantctl"), "--model-config", str(ROOT / "model-config.yaml"),
           "--redis-url", f"redis://127.0.0.1:{DEMO_REDIS_PORT}/0", "--store", str(VAR / "adapters"),
           "--base-model-dir", str(base_model), "--key-file", str(VAR / "torchserve" / "key_file.json"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"tenantctl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def onboard(base_model: Path, tenant: str, adapter_dir: Path) -> str:
    """Onboard unless the tenant's current version already holds these exact weights."""
    sha = hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    shown = tenantctl(base_model, "--json", "show", tenant, check=False)
    if shown.returncode == 0:
        current = json.loads(shown.stdout)["record"]
        if current["sha256"] == sha:
            return f"{current['adapter_id']} (already onboarded)"
    record = json.loads(tenantctl(base_model, "--json", "onboard", tenant, str(adapter_dir)).stdout)
    return f"{record['adapter_id']} (onboarded)"


def ask(key: str, tenant: str, question: str, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_new_tokens": 40, **extra}
    r = requests.post(f"{INFERENCE}/predictions/loraplex", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {key}", "X-Tenant-ID": tenant})
    data = r.json() if r.headers.get("content-type", "").startswith("application/json") or r.text.startswith("{") else {}
    return {"status": r.status_code, **data}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-model", type=Path, required=True)
    p.add_argument("--adapters", type=Path, required=True)
    args = p.parse_args(argv)

    print("== starting redis-server (127.0.0.1:%d) and torchserve (127.0.0.1:8080-8082)" % DEMO_REDIS_PORT, flush=True)
    VAR.mkdir(parents=True, exist_ok=True)
    start_demo_stack(VAR)
    key = json.loads((VAR / "torchserve" / "key_file.json").read_text())["inference"]["key"]

    print("\n== onboarding tenants with tenantctl (the server keeps running)")
    for tenant in TENANTS:
        print(f"   {tenant:8s} -> {onboard(args.base_model, tenant, args.adapters / tenant)}")

    print("\n== asking every question as each tenant, an unknown tenant, and adapter=base (sent concurrently)")
    cases = [(t, {}) for t in TENANTS] + [("stranger", {}), ("pirate", {"adapter": "base"})]
    jobs = [(tenant, extra, q) for q in QUESTIONS for tenant, extra in cases]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: ask(key, j[0], j[2], **j[1]), jobs))
    for q_index, question in enumerate(QUESTIONS):
        print(f"\nQ: {question}")
        for (tenant, extra, _), ans in list(zip(jobs, answers))[q_index * len(cases):(q_index + 1) * len(cases)]:
            label = f"{tenant}" + (" (adapter=base)" if extra else "")
            served = ans.get("adapter", "?") + (f", fallback={ans['fallback']}" if ans.get("fallback") else "")
            text = ans.get("text", ans.get("error", "")).strip().replace("\n", " ")
            print(f"  {label:22s} [{served}]")
            print(textwrap.indent(textwrap.fill(text, 96), "      "))

    print("\n== tenantctl status (which worker holds which adapter)")
    print(tenantctl(args.base_model, "status").stdout.rstrip())
    print("\nServer still running: inference 127.0.0.1:8080 (token in var/torchserve/key_file.json).")
    print("Onboarding over HTTP: /tenants on 127.0.0.1:8081 (management token) and the onboarding service on "
          "127.0.0.1:8083 (uploads; README 'Onboarding over HTTP').")
    print("Stop everything with: make stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
