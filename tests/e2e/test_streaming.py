"""Streaming and per-step scheduling over a real TorchServe (issue 13 items 6-8).

One private torchserve serves two archives of the session's tiny Llama, built by
`build_archive(scheduler=...)`: /predictions/loraplex (continuous: asyncCommunication,
one request a message, chunks as tokens come) and /predictions/static (batch to
completion, TorchServe batching). Driven by `requests` (our JSON API's NDJSON) and by
the official `openai` client (SSE), with the inference token as api_key. The oracles: the
same greedy request not streamed, and PEFT (the tiny tokenizer is byte-level, so replies
hold incomplete UTF-8 characters that a stream must hold back, not split)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import requests
import yaml

from loraplex_testing.archive import build_archive
from loraplex_testing.oracle import reference_generate
from loraplex_testing.services import TorchServe

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "hello world"  # the tiny model's greedy answer to it runs LONG tokens without an EOS
LONG = 400
NEW = 24
KV_ROWS = 2  # rows running at once; one more may wait, the next is 503 (max_waiting 1)
PREFIX = "stream"


class Serving:
    def __init__(self, ts: TorchServe, tmp: Path, redis_url: str, model: Path) -> None:
        self.ts, self.tmp, self.redis_url, self.model = ts, tmp, redis_url, model
        self.token = ts.keys()["inference"]["key"]

    def url(self, model: str = "loraplex") -> str:
        return f"{self.ts.inference_url}/predictions/{model}"

    def post(self, body: dict, *, model: str = "loraplex", tenant: str | None = None, stream: bool = False,
             timeout: float = 120) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}", **({"X-Tenant-ID": tenant} if tenant else {})}
        return requests.post(self.url(model), json=body, headers=headers, timeout=timeout, stream=stream)

    def client(self, model: str = "loraplex") -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url(model)}/1.0/v1", api_key=self.token, max_retries=0, timeout=120)

    def tenantctl(self, *args: str) -> subprocess.CompletedProcess:
        exe = Path(sys.executable).parent / "tenantctl"
        cmd = [str(exe), "--json", "--model-config", str(self.tmp / "model-config.yaml"), "--redis-url",
               self.redis_url, "--store", str(self.tmp / "adapters"), "--base-model-dir", str(self.model),
               "--management-url", self.ts.management_url, "--key-file", str(self.ts.workdir / "key_file.json"),
               *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={"LORAPLEX_REDIS_PREFIX": PREFIX, "PATH": "/usr/bin:/bin"})


def _ready(ts: TorchServe, model: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        req = urllib.request.Request(f"{ts.management_url}/models/{model}",
                                     headers={"Authorization": f"Bearer {ts.keys()['management']['key']}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                if any(w.get("status") == "READY" for w in json.loads(resp.read())[0].get("workers", [])):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"model {model} not ready after {timeout}s; see {ts.workdir}/logs")


@pytest.fixture(scope="module")
def serving(tiny_model_dir, redis_url, tmp_path_factory) -> Serving:
    tmp = tmp_path_factory.mktemp("streaming")
    cfg = yaml.safe_load((ROOT / "model-config.yaml").read_text())
    cfg["handler"].update({"num_slots": 4, "base_model_name": "", "max_new_tokens_cap": LONG,
                           "max_prompt_tokens": 64, "kv_rows": KV_ROWS, "max_waiting": 1, "retry_after_s": 2,
                           "idle_ttl_s": 600})
    (tmp / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    store = tmp / "model_store"
    build_archive(tiny_model_dir, store, config_file=tmp / "model-config.yaml", scheduler="continuous")
    build_archive(tiny_model_dir, store, name="static", config_file=tmp / "model-config.yaml", scheduler="static")
    env = {"LORAPLEX_REDIS_URL": redis_url, "LORAPLEX_ADAPTER_STORE": str(tmp / "adapters"),
           "LORAPLEX_REDIS_PREFIX": PREFIX}
    ts = TorchServe(tmp / "ts", store, env=env, extra_config={"load_models": "loraplex,static"})
    try:
        ts.start(timeout=300)
        _ready(ts, "static", 300)
        yield Serving(ts, tmp, redis_url, tiny_model_dir)
    finally:
        ts.stop()


@pytest.fixture(scope="module")
def tenant(serving, tiny_adapters) -> str:
    done = serving.tenantctl("onboard", "streamer", str(tiny_adapters["a"]))
    assert done.returncode == 0, done.stderr
    return "streamer"


def _ndjson(response: requests.Response) -> list[tuple[float, dict]]:
    """(arrival time, chunk) for each NDJSON line, read as it arrives."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [(time.perf_counter(), json.loads(line)) for line in response.iter_lines() if line]


def test_json_api_stream_concatenates_to_the_non_streamed_reply(serving, tenant, tiny_adapters):
    body = {"prompt": PROMPT, "max_new_tokens": NEW, "logprobs": 2}
    whole = serving.post(body, tenant=tenant).json()
    assert whole["adapter"] == "streamer@v1"
    chunks = [c for _, c in _ndjson(serving.post({**body, "stream": True}, tenant=tenant, stream=True))]
    *pieces, last = chunks
    assert len(pieces) > 1  # streamed, not one reply in disguise
    assert "".join(c["text"] for c in pieces) == whole["text"]
    assert last == {"text": "", **{k: whole[k] for k in ("finish_reason", "usage", "tenant", "task", "adapter",
                                                         "version", "version_by", "fallback", "route")}}
    assert [t for c in pieces for t in c["logprobs"]["tokens"]] == whole["logprobs"]["tokens"]
    assert [lp for c in pieces for lp in c["logprobs"]["token_logprobs"]] == pytest.approx(
        whole["logprobs"]["token_logprobs"], abs=1e-5)
    # ... and the text is PEFT's
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(serving.model))
    want = reference_generate(serving.model, tiny_adapters["a"], tok(PROMPT)["input_ids"], NEW)
    assert whole["text"] == tok.decode(want, skip_special_tokens=True)


def test_openai_client_streams_chat_and_completions(serving, tenant):
    client = serving.client()
    comp_args = {"model": tenant, "prompt": PROMPT, "max_tokens": NEW, "temperature": 0}
    whole = client.completions.create(**comp_args)
    chunks = list(client.completions.create(**comp_args, stream=True))
    assert len(chunks) > 2 and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage
    assert chunks[-1].model_extra["loraplex"] == {"tenant": tenant, "task": "default", "adapter": "streamer@v1",
                                                     "version": 1, "version_by": "current", "fallback": None,
                                                     "route": {"task": "default", "by": "default", "score": None}}

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_args = {"model": tenant, "messages": messages, "max_tokens": NEW, "temperature": 0}
    whole = client.chat.completions.create(**chat_args)
    chunks = list(client.chat.completions.create(**chat_args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with client.chat.completions.with_streaming_response.create(**chat_args, stream=True) as raw:
        assert raw.headers["content-type"] == "text/event-stream"
        assert raw.text().endswith("data: [DONE]\n\n")


def test_a_stream_that_fails_before_its_first_chunk_gets_an_ordinary_error(serving):
    r = serving.post({"prompt": PROMPT, "max_new_tokens": LONG + 1, "stream": True})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert "'max_new_tokens' is" in r.json()["error"]
    with pytest.raises(openai.BadRequestError) as e:
        list(serving.client().completions.create(model="base", prompt=PROMPT, max_tokens=LONG + 1, stream=True))
    assert "'max_tokens' is" in e.value.message
    with pytest.raises(openai.NotFoundError):  # a pin of an unknown tenant
        list(serving.client().chat.completions.create(model="nobody@v1", messages=[{"role": "user", "content": "x"}],
                                                      stream=True))


def _short_during_long(serving, model: str) -> tuple[float, float, float, float, list[tuple[float, dict]]]:
    """A streamed LONG-token request, then (once it streams, or 0.2 s later on the static archive,
    which streams nothing before the end) a 4-token one. (long start, short start, short end,
    long end, the long one's chunks with their arrival times)."""
    long_chunks: list[tuple[float, dict]] = []
    first = threading.Event()

    def long_stream():
        r = serving.post({"prompt": PROMPT, "max_new_tokens": LONG, "stream": True}, model=model, stream=True,
                         timeout=300)
        for line in r.iter_lines():
            if line:
                long_chunks.append((time.perf_counter(), json.loads(line)))
                first.set()
        first.set()

    started = time.perf_counter()
    worker = threading.Thread(target=long_stream)
    worker.start()
    if model == "static":
        time.sleep(0.2)
    else:
        assert first.wait(120), "the long request sent no chunk"
    short_start = time.perf_counter()
    short = serving.post({"prompt": "count", "max_new_tokens": 4}, model=model)
    short_end = time.perf_counter()
    worker.join(300)
    assert short.status_code == 200, short.text
    assert short.json()["usage"]["completion_tokens"] == 4
    assert long_chunks[-1][1]["finish_reason"] == "length"
    assert long_chunks[-1][1]["usage"]["completion_tokens"] == LONG
    return started, short_start, short_end, long_chunks[-1][0], long_chunks


def test_a_short_request_finishes_while_a_long_one_is_still_generating(serving):
    """Rows are scheduled per step: a short request that arrives while a long one streams is
    answered at once, not after the long one. The static archive, batch to completion, is the
    control: there the short one waits for the long one's batch."""
    started, short_start, short_end, long_end, chunks = _short_during_long(serving, "loraplex")
    assert short_end < long_end
    assert sum(1 for t, _ in chunks if t > short_end) > 10  # the long one kept streaming after it
    assert short_end - short_start < 0.25 * (long_end - started), (short_end - short_start, long_end - started)

    started, short_start, short_end, long_end, chunks = _short_during_long(serving, "static")
    assert len(chunks) == 2  # the whole answer, then the last chunk
    assert short_end > long_end - 0.05  # served after the long one's batch


def test_static_archive_serves_the_json_api_and_streams_one_chunk(serving):
    body = {"prompt": PROMPT, "max_new_tokens": NEW}
    continuous = serving.post(body).json()
    static = serving.post(body, model="static")
    assert static.status_code == 200 and static.headers["content-type"] == "application/json"
    assert static.json() == continuous
    chunks = [c for _, c in _ndjson(serving.post({**body, "stream": True}, model="static", stream=True))]
    assert chunks == [{"text": continuous["text"]},
                      {"text": "", **{k: continuous[k] for k in ("finish_reason", "usage", "tenant", "task",
                                                                  "adapter", "version", "version_by", "fallback",
                                                                  "route")}}]
    client = serving.client("static")
    streamed = list(client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=NEW, temperature=0, stream=True))
    whole = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=NEW, temperature=0)
    assert len(streamed) == 2 and streamed[0].choices[0].delta.content == whole.choices[0].message.content
    assert streamed[1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert streamed[1].usage == whole.usage


def test_a_full_queue_is_503_with_retry_after_on_the_wire(serving):
    """KV_ROWS long rows running and one waiting: the next request is refused at once with
    Retry-After (the worker's header through TorchServe), on both APIs; the others are served."""
    streams, firsts = [], []

    def long_stream(i):
        r = serving.post({"prompt": PROMPT, "max_new_tokens": LONG, "stream": True}, stream=True, timeout=300)
        lines = []
        for line in r.iter_lines():
            if line:
                lines.append(json.loads(line))
                firsts[i].set()
        streams[i] = lines
        firsts[i].set()

    threads = []
    for i in range(KV_ROWS + 1):
        streams.append(None)
        firsts.append(threading.Event())
        threads.append(threading.Thread(target=long_stream, args=(i,)))
    for i in range(KV_ROWS):
        threads[i].start()
    assert all(firsts[i].wait(120) for i in range(KV_ROWS))  # both rows are running
    threads[KV_ROWS].start()
    deadline = time.time() + 30
    while _scheduler(serving)["waiting"] < 1:
        assert time.time() < deadline, _scheduler(serving)
        time.sleep(0.02)
    full = serving.post({"prompt": "count", "max_new_tokens": 4})
    with pytest.raises(openai.InternalServerError) as e:
        serving.client().completions.create(model="base", prompt="count", max_tokens=4, temperature=0)
    for t in threads:
        t.join(300)
    assert full.status_code == 503 and full.headers["Retry-After"] == "2", full.text
    assert full.json()["type"] == "QueueFull"
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "2"
    assert e.value.code == "QueueFull"
    assert all(lines[-1]["usage"]["completion_tokens"] == LONG for lines in streams)  # the others were served


def _scheduler(serving) -> dict:
    shown = serving.ts.describe()[0]["customizedMetadata"]
    return (json.loads(shown) if isinstance(shown, str) else shown)["scheduler"]


def test_describe_in_asynchronous_mode(serving):
    shown = serving.ts.describe()[0]["customizedMetadata"]
    described = json.loads(shown) if isinstance(shown, str) else shown
    assert described["scheduler"]["kind"] == "continuous" and described["scheduler"]["running"] == 0
    assert "engine" in described and "resident" in described
