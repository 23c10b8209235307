"""The frontend forgets every answered job (asynchronous TorchServe, the continuous scheduler).

TorchServe 0.12's `AsyncBatchAggregator` keeps each job sent to the worker in a map until a
reply marked ``ts_stream_next: false``; a reply sent whole carries no such mark, so without
`LoraplexHandler._release_job` every non-streamed request stayed in that map (and on the
frontend's heap) for the server's life, and a lookup racing the growing map's resize made the
frontend restart the worker. The oracle is the frontend's own heap: live
`org.pytorch.serve.job.RestJob` objects counted by `jcmd GC.class_histogram` (a full GC first),
before and after requests of every reply shape (our JSON API's 200 and 4xx, an unknown tenant's
fallback, OpenAI completions and its error, a stream)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e


def _jcmd() -> str:
    found = shutil.which("jcmd") or str(Path(shutil.which("java") or "java").resolve().parent / "jcmd")
    if not Path(found).exists():
        pytest.fail("jcmd not found: scripts/install.sh installs the JDK (openjdk-17-jdk-headless) that has it")
    return found


def live_jobs(pid: int) -> int:
    out = subprocess.run([_jcmd(), str(pid), "GC.class_histogram"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    m = re.search(r"^\s*\d+:\s+(\d+)\s+\d+\s+org\.pytorch\.serve\.job\.RestJob\s*$", out, re.M)
    return int(m.group(1)) if m else 0


def test_the_frontend_keeps_no_job_after_its_reply(stack):
    pid = stack.ts.frontend_pid()
    token = {"Authorization": f"Bearer {stack.ts.keys()['inference']['key']}"}
    openai_url = f"{stack.ts.inference_url}/predictions/loraplex/1.0/v1/completions"
    stack.ask(None, {"prompt": "warm", "max_new_tokens": 2})
    before = live_jobs(pid)
    sent = 0
    for i in range(8):
        r = stack.ask(None, {"prompt": f"hello {i}", "max_new_tokens": 2})
        assert r.status_code == 200 and "text" in r.json(), r.text
        sent += 1
    for _ in range(4):
        r = stack.ask(None, b"{not json")
        assert r.status_code == 400 and "error" in r.json(), r.text
        sent += 1
    for _ in range(4):
        r = stack.ask("nobody-such", {"prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 200 and r.json()["fallback"] == "unknown_tenant", r.text
        sent += 1
    for _ in range(4):
        r = requests.post(openai_url, json={"model": "base", "prompt": "hi", "max_tokens": 2}, headers=token, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None, r.text
        r = requests.post(openai_url, json={"model": "base", "prompt": "hi", "max_tokens": -1}, headers=token, timeout=60)
        assert r.status_code == 400 and "error" in r.json(), r.text
        sent += 2
    for _ in range(4):
        r = stack.ask(None, {"prompt": "hi", "max_new_tokens": 2, "stream": True})
        assert r.status_code == 200 and r.text.strip(), r.text
        sent += 1
    after = live_jobs(pid)
    assert sent == 28
    assert after - before <= 2, f"{after - before} of {sent} answered jobs are still held by the frontend"
