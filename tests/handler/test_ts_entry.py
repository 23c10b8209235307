"""The TorchServe entry point, driven the way TorchServe 0.12's Python side drives
it: a batch as the frontend frames it goes through ts.service's own
`retrieve_data_for_inference` into a real `ts.context.Context`, then `handle`.

What the frontend sends was observed on a real torchserve (see handler/ts_entry.py):
a management describe (`GET /models/<m>?customized=true`) is a one-request batch
with a `describe: True` header, no input parameter and no `explain` header, which
the frontend adds to (and overwrites on) every REST inference request."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("ts")
from ts.context import Context  # noqa: E402
from ts.service import Service  # noqa: E402

from handler.service import Reply  # noqa: E402
from handler.ts_entry import LoraplexHandler  # noqa: E402


class _Metrics:
    def add_time(self, *args, **kwargs):
        pass


class _FakeService:
    """Stands in for LoraplexService: echoes each request's tenant header, 400 for a bad body."""

    def __init__(self):
        self.batches = []
        self.describes = 0

    def handle_batch(self, batch):
        self.batches.append(batch)
        out = []
        for raw in batch:
            if not isinstance(raw.body, dict):
                out.append(Reply(400, "Bad Request", {"error": "bad", "type": "InvalidRequest", "status": 400}))
            else:
                out.append(Reply(200, "OK", {"text": "ok", "tenant": raw.headers.get("X-Tenant-ID")}))
        return out

    def describe(self):
        self.describes += 1
        return {"worker": {"pid": 1}, "resident": [{"adapter": "secret@v1"}]}


def _inference(tenant, body=b'{"prompt": "x"}', *, route="predictions", **extra):
    """An inference request as the frontend frames it: /predictions adds `explain` and `url_path`;
    the KServe routes (/v1/models/<m>:predict, /v2/models/<m>/infer) add `explain` only."""
    added = {"explain": "False", "url_path": ""} if route == "predictions" else {"explain": "False"}
    headers = {**added, "Host": "127.0.0.1", "Content-Type": "application/json",
               **({"X-Tenant-ID": tenant} if tenant else {}), **extra}
    return {"requestId": f"req-{tenant}".encode(),
            "headers": [{"name": k.encode(), "value": v.encode()} for k, v in headers.items()],
            "parameters": [{"name": "body", "contentType": "application/json", "value": json.loads(body)}]}


def _management_describe():
    headers = {"content-length": "0", "Host": "127.0.0.1", "describe": "True"}
    return {"requestId": b"describe", "parameters": [],
            "headers": [{"name": k.encode(), "value": v.encode()} for k, v in headers.items()]}


def _run(batch):
    handler = LoraplexHandler()
    handler.service = _FakeService()
    handler.initialized = True
    context = Context("loraplex", "/tmp", {}, len(batch), None, "0.12", metrics=_Metrics())
    headers, input_batch, ids = Service.retrieve_data_for_inference(batch)
    context.request_ids, context.request_processor = ids, headers
    output = handler.handle(input_batch, context)
    return handler.service, output, [context.get_response_status(i) for i in range(len(batch))]


def test_management_describe_is_answered():
    svc, output, _ = _run([_management_describe()])
    assert svc.describes == 1 and svc.batches == []
    assert json.loads(output[0])["resident"] == [{"adapter": "secret@v1"}]


def test_a_describe_header_on_an_inference_request_is_just_a_request():
    svc, output, _ = _run([_inference("acme", describe="True")])
    assert svc.describes == 0
    assert json.loads(output[0]) == {"text": "ok", "tenant": "acme"}


def test_a_describe_header_on_the_kserve_routes_is_just_a_request():
    svc, output, _ = _run([_inference("acme", route="v2", describe="True")])
    assert svc.describes == 0
    assert json.loads(output[0]) == {"text": "ok", "tenant": "acme"}


def test_a_describe_header_with_an_empty_form_body_is_just_a_request():
    """A form post without fields has no input parameter at all, like a describe; `explain` tells them apart."""
    request = _inference("acme", describe="True")
    request["parameters"] = []
    svc, output, statuses = _run([request])
    assert svc.describes == 0 and statuses[0][0] == 400


def test_a_describe_header_first_in_a_batch_fails_nobody():
    batch = [_inference("evil", describe="True")] + [_inference(f"t{i}") for i in range(4)]
    svc, output, statuses = _run(batch)
    assert svc.describes == 0 and len(output) == len(batch)
    assert [json.loads(o)["tenant"] for o in output] == ["evil", "t0", "t1", "t2", "t3"]
    assert all(code in (None, 200) for code, _ in statuses)


def test_each_request_keeps_its_own_status():
    batch = [_inference("a"), _inference("b"), _inference("c")]
    batch[1]["parameters"][0]["value"] = b"{not json"
    _, output, statuses = _run(batch)
    assert [s[0] for s in statuses] == [200, 400, 200]
    assert len(output) == 3


def test_a_service_crash_answers_every_request_500_instead_of_failing_the_batch():
    handler = LoraplexHandler()

    class Exploding(_FakeService):
        def handle_batch(self, batch):
            raise RuntimeError("bug at /secret/path")

    handler.service = Exploding()
    handler.initialized = True
    batch = [_inference("a"), _inference("b")]
    context = Context("loraplex", "/tmp", {}, 2, None, "0.12", metrics=_Metrics())
    headers, input_batch, ids = Service.retrieve_data_for_inference(batch)
    context.request_ids, context.request_processor = ids, headers
    output = handler.handle(input_batch, context)
    assert len(output) == 2
    assert [context.get_response_status(i)[0] for i in range(2)] == [500, 500]
    assert all("/secret" not in o for o in output)


# -- streaming and asynchronous TorchServe (asyncCommunication) --------------------------------------
# Driven through ts.async_service's own `predict` on a real ts.service.Service whose socket is one end
# of a socketpair: what TorchServe would write to the frontend is read back from the other end.

import asyncio  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from ts import async_service  # noqa: E402

from handler.routes import route_for  # noqa: E402
from handler.scheduler import Finished, TextDelta  # noqa: E402
from handler.stream_format import NDJSON, SSE  # noqa: E402

FINAL = {"text": "Hello", "tenant": None, "adapter": "base", "fallback": "no_tenant", "finish_reason": "length",
         "usage": {"prompt_tokens": 2, "completion_tokens": 3}}


@dataclass
class _Pred:
    request_id: str
    content_type: str
    status: int
    headers: dict
    body: bytes


def _frames(data: bytes) -> list[list[_Pred]]:
    """TorchServe's predict-response frames (ts/protocol/otf_message_handler.create_predict_response)."""
    at, frames = 0, []

    def i32():
        nonlocal at
        (value,) = struct.unpack_from("!i", data, at)
        at += 4
        return value

    def blob():
        nonlocal at
        n = i32()
        at += n
        return data[at - n:at]

    while at < len(data):
        i32(), blob()  # the message's code and text
        preds = []
        while (n := i32()) != -1:
            request_id = data[at:at + n].decode()
            at += n
            content_type, status, _phrase = blob().decode(), i32(), blob()
            headers = {}
            for _ in range(i32()):
                key = blob().decode()
                headers[key] = blob().decode()
            preds.append(_Pred(request_id, content_type, status, headers, blob()))
        frames.append(preds)
    return frames


@dataclass
class _Seen:
    """One request's response as its client gets it, and whether the frontend dropped the job."""

    status: int
    content_type: str
    headers: dict
    body: bytes
    chunked: bool
    released: bool = False


def _client_view(messages: list[list[_Pred]]) -> dict[str, _Seen]:
    """What TorchServe 0.12's asynchronous frontend makes of the worker's messages, per request
    (`AsyncBatchAggregator.sendResponse`, `RestJob.responseInference`): a first message without
    ``ts_stream_next`` is a whole response; one marked ``true`` starts a chunked response whose head
    is that message's status, headers and content type and whose body is every message's body
    up to the one marked ``false``; a message marked ``false`` drops the job. Fails on what would
    break a response there: a last chunk with no head, anything after the job was dropped, and
    anything after a whole response but a ``false`` closer of an error (whose connection the
    frontend closes, so the closer's empty writes go nowhere)."""
    seen: dict[str, _Seen] = {}
    for frame in messages:
        for p in frame:
            mark = p.headers.get("ts_stream_next")
            s = seen.get(p.request_id)
            if s is None:
                assert mark != "false", f"{p.request_id}: a last chunk with no head"
                s = seen[p.request_id] = _Seen(p.status, p.content_type, dict(p.headers), p.body, mark == "true")
            else:
                assert not s.released, f"{p.request_id}: a message after the frontend dropped the job"
                if s.chunked:
                    s.body += p.body
                else:
                    assert mark == "false" and s.status >= 400 and not p.body, \
                        f"{p.request_id}: more after a whole {s.status} response"
            s.released = s.released or mark == "false"
    return seen


class _Ticket:
    def __init__(self, exchange, events):
        self.exchange, self.stream = exchange, exchange.request.stream
        self.events, self.cancelled = list(events), False

    async def next(self):
        await asyncio.sleep(0)
        event = self.events.pop(0)
        if isinstance(event, BaseException):
            raise event
        return event

    def cancel(self):
        self.cancelled = True


class _AsyncService(_FakeService):
    """submit() answers by prompt: a Reply, or a ticket with the scripted events."""

    scheduler_kind = "continuous"

    def __init__(self, script):
        super().__init__()
        self.script, self.tickets, self.threads = script, [], set()

    def submit(self, raw, loop):
        assert loop is not None
        self.threads.add(threading.current_thread().name)
        exchange = route_for(raw.headers).parse(raw.body, raw.headers)
        got = self.script[exchange.request.prompt or exchange.request.messages[0]["content"]]
        if isinstance(got, Reply):
            return got
        self.tickets.append(_Ticket(exchange, got))
        return self.tickets[-1]


def _request(i, body, url_path=""):
    return {"requestId": f"req-{i}".encode(),
            "headers": [{"name": k.encode(), "value": v.encode()}
                        for k, v in {"explain": "False", "url_path": url_path}.items()],
            "parameters": [{"name": "body", "contentType": "application/json", "value": body}]}


def _run_async(service, batch):
    """One message through ts.async_service.predict; (intermediate frames, final frame, handler)."""
    handler = LoraplexHandler()
    handler.service, handler.initialized, handler.async_mode = service, True, True
    ts_service = Service("loraplex", "/tmp", None, handler.handle, None, 1, metrics_cache=_Metrics())
    ts_service.context.model_yaml_config = {"asyncCommunication": True}
    ours, frontend = socket.socketpair()
    ts_service.set_cl_socket(ours)
    try:
        final = asyncio.run(async_service.predict(ts_service, batch))
        frontend.setblocking(False)
        sent = b""
        try:
            while chunk := frontend.recv(1 << 16):
                sent += chunk
        except BlockingIOError:
            pass
        assert isinstance(ours, LoraplexHandler.SerialSendSocket)  # the two writers are serialised
        return _frames(sent), _frames(bytes(final))[0], handler
    finally:
        ours.close()
        frontend.close()


def test_async_stream_sends_each_delta_as_one_chunk_then_the_last():
    events = [TextDelta("Hel", (1,), None), TextDelta("", (2,), None), TextDelta("lo", (3,), None),
              Finished(Reply(200, "OK", FINAL))]
    svc = _AsyncService({"s": events})
    chunks, final, _ = _run_async(svc, [_request(0, {"prompt": "s", "stream": True})])
    assert [[json.loads(p.body) for p in frame] for frame in chunks] == [[{"text": "Hel"}], [{"text": "lo"}]]
    assert all(f[0].headers["ts_stream_next"] == "true" and f[0].content_type == NDJSON for f in chunks)
    assert all(f[0].request_id == "req-0" and f[0].status == 200 for f in chunks)
    assert final[0].headers["ts_stream_next"] == "false" and final[0].content_type == NDJSON
    assert json.loads(final[0].body) == {"text": "", **{k: FINAL[k] for k in
                                                         ("finish_reason", "usage", "tenant", "adapter", "fallback")}}
    assert svc.threads and "MainThread" not in svc.threads  # submit ran off the event loop


def test_async_openai_stream_is_sse():
    from handler.openai_api import Endpoint, completion_body, parse

    chat = {"model": "base", "messages": [{"role": "user", "content": "c"}], "stream": True, "temperature": 0}
    req = parse(Endpoint.CHAT, chat, {})
    svc = _AsyncService({"c": [TextDelta("Hel", (1,), None), Finished(Reply(200, "OK", completion_body(req, FINAL)))]})
    chunks, final, _ = _run_async(svc, [_request(0, chat, "v1/chat/completions")])
    assert len(chunks) == 1 and chunks[0][0].content_type == SSE
    first = json.loads(chunks[0][0].body.decode().removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    events = final[0].body.decode().split("\n\n")
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"] == {"content": "lo"}
    last = json.loads(events[1].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["total_tokens"] == 5
    assert last["id"] == first["id"] and events[2:] == ["data: [DONE]", ""]


def test_async_replies_keep_status_headers_and_their_own_requests():
    """A 503 with Retry-After (an immediate Reply), a non-streamed ticket and a streamed one in one
    message: each client gets its own status, headers and body, and the frontend drops every job
    (`LoraplexHandler._release_job`: the plain reply goes out as one chunk, the error whole then closed)."""
    full = Reply(503, "Queue Full", {"error": "queue full", "type": "QueueFull", "status": 503},
                 headers={"Retry-After": "1"})
    svc = _AsyncService({"busy": full, "plain": [TextDelta("Hello", (1,), None), Finished(Reply(200, "OK", FINAL))],
                         "s": [TextDelta("Hel", (1,), None), Finished(Reply(200, "OK", FINAL))]})
    batch = [_request(0, {"prompt": "busy"}), _request(1, {"prompt": "plain"}),
             _request(2, {"prompt": "s", "stream": True})]
    chunks, final, _ = _run_async(svc, batch)
    assert sorted(p.request_id for f in chunks for p in f) == ["req-0", "req-1", "req-2"]  # one message each
    view = _client_view([*chunks, final])
    busy, plain, streamed = view["req-0"], view["req-1"], view["req-2"]
    assert busy.status == 503 and busy.headers["Retry-After"] == "1" and busy.content_type == "application/json"
    assert json.loads(busy.body)["type"] == "QueueFull" and not busy.chunked
    assert plain.status == 200 and json.loads(plain.body) == FINAL and plain.content_type == "application/json"
    assert streamed.status == 200 and streamed.content_type == NDJSON
    assert [json.loads(line)["text"] for line in streamed.body.decode().splitlines()] == ["Hel", "lo", ""]
    assert all(s.released for s in view.values())


def test_async_failure_before_the_first_chunk_is_an_ordinary_error_after_it_the_last_chunk():
    bad = Reply(404, "Unknown Tenant", {"error": "no such tenant", "type": "TenantNotFound", "status": 404})
    svc = _AsyncService({"early": [Finished(bad)], "late": [TextDelta("Hel", (1,), None), RuntimeError("/secret")]})
    chunks, final, _ = _run_async(svc, [_request(0, {"prompt": "early", "stream": True}),
                                        _request(1, {"prompt": "late", "stream": True})])
    view = _client_view([*chunks, final])
    early, late = view["req-0"], view["req-1"]
    assert early.status == 404 and early.content_type == "application/json" and not early.chunked
    assert json.loads(early.body)["type"] == "TenantNotFound"
    assert late.status == 200 and late.content_type == NDJSON
    assert json.loads(late.body.decode().splitlines()[-1]) == {
        "error": {"message": "internal error; see the worker log", "type": "RuntimeError", "status": 500}}
    assert early.released and late.released
    assert svc.tickets[1].cancelled and not svc.tickets[0].cancelled  # a failed stream frees its row


def test_async_describe_and_static_scheduler():
    svc = _AsyncService({})
    chunks, final, _ = _run_async(svc, [_management_describe()])
    assert chunks == []  # a describe job takes exactly one reply
    assert svc.describes == 1 and json.loads(final[0].body)["resident"] == [{"adapter": "secret@v1"}]

    class Static(_FakeService):
        scheduler_kind = "static"

        def handle_batch(self, batch):
            self.batches.append(batch)
            return [Reply(200, "OK", FINAL) for _ in batch]

    svc = Static()
    chunks, final, _ = _run_async(svc, [_request(0, {"prompt": "x"}), _request(1, {"prompt": "y", "stream": True})])
    assert len(svc.batches) == 1  # one handle_batch call
    view = _client_view([*chunks, final])
    assert json.loads(view["req-0"].body) == FINAL and view["req-0"].content_type == "application/json"
    # A stream on the static path: the whole answer in the stream's format (one text chunk, then the last)
    assert view["req-1"].content_type == NDJSON
    assert [json.loads(line)["text"] for line in view["req-1"].body.decode().splitlines()] == ["Hello", ""]
    assert view["req-0"].released and view["req-1"].released


def test_sync_stream_is_one_text_chunk_then_the_last():
    class Whole(_FakeService):
        def handle_batch(self, batch):
            self.batches.append(batch)
            return [Reply(200, "OK", FINAL) for _ in batch]

    handler = LoraplexHandler()
    handler.service, handler.initialized = Whole(), True
    batch = [_inference("a", b'{"prompt": "x", "stream": true}'), _inference("b")]
    context = Context("loraplex", "/tmp", {}, 2, None, "0.12", metrics=_Metrics())
    headers, input_batch, ids = Service.retrieve_data_for_inference(batch)
    context.request_ids, context.request_processor = ids, headers
    streamed, plain = handler.handle(input_batch, context)
    assert [json.loads(line) for line in streamed.splitlines()] == [
        {"text": "Hello"}, {"text": "", **{k: FINAL[k] for k in ("finish_reason", "usage", "tenant", "adapter",
                                                                  "fallback")}}]
    assert context.get_response_content_type(0) == NDJSON
    assert json.loads(plain) == FINAL and context.get_response_content_type(1) == "application/json"


def test_serial_send_socket_writes_whole_messages_from_two_threads():
    """Two threads each `sendall` one message larger than the socket buffer while the reader is slow:
    with the lock the reader sees one whole message, then the other."""
    ours, frontend = socket.socketpair()
    ours.__class__ = LoraplexHandler.SerialSendSocket
    size = 4 << 20
    senders = [threading.Thread(target=ours.sendall, args=(bytes([c]) * size,)) for c in b"ab"]
    for t in senders:
        t.start()
    got = bytearray()
    while len(got) < 2 * size:
        got += frontend.recv(4096)
    for t in senders:
        t.join()
    ours.close()
    frontend.close()
    assert got in (b"a" * size + b"b" * size, b"b" * size + b"a" * size)
