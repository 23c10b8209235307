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
