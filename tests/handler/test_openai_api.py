"""The OpenAI translation (handler/openai_api.py) and the url_path routing (handler/routes.py), pure:
an OpenAI body becomes the very InferenceRequest our JSON API builds for the same ask, our reply
becomes OpenAI's objects, every error gets OpenAI's shape with errors.py's status."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handler import openai_api
from handler.errors import InvalidRequest, RequestError, TenantConflict, UnknownEndpoint, http_status
from handler.openai_api import Endpoint, completion_body, error_body, models_body, models_request, parse
from handler.request import parse_request
from handler.routes import route_for
from tenant_registry.errors import InvalidTenantId, RegistryUnavailable, TenantDisabled

CHAT, COMP = Endpoint.CHAT, Endpoint.COMPLETIONS
MSGS = [{"role": "user", "content": "hello"}]


def chat(headers=None, **fields):
    return parse(CHAT, {"model": "acme", "messages": MSGS, **fields}, headers or {})


def comp(headers=None, **fields):
    return parse(COMP, {"model": "acme", "prompt": "hello", **fields}, headers or {})


@pytest.mark.parametrize("openai_body, ours", [
    ({"messages": MSGS, "temperature": 0, "max_tokens": 5, "stop": ["\n"], "seed": 3},
     {"messages": MSGS, "max_new_tokens": 5, "stop": ["\n"], "seed": 3}),
    ({"messages": MSGS, "temperature": 0.7, "top_p": 0.9, "seed": 1, "max_completion_tokens": 4},
     {"messages": MSGS, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 1, "max_new_tokens": 4}),
    ({"messages": MSGS}, {"messages": MSGS, "do_sample": True}),  # OpenAI's default temperature is 1
    ({"prompt": "hi there", "temperature": 0.0, "stop": "zz"}, {"prompt": "hi there", "stop": "zz"}),
])
def test_same_request_as_our_json_api(openai_body, ours):
    endpoint = CHAT if "messages" in openai_body else COMP
    headers = {"X-Tenant-Key": "k"}
    got = parse(endpoint, {"model": "acme", **openai_body}, headers).request
    want = parse_request({"tenant": "acme", **ours}, headers)
    assert got == want and got.key == "k"
    assert got.do_sample == ("do_sample" in ours)


def test_raw_bytes_body_and_nulls_are_not_sent():
    req = parse(CHAT, b'{"model": "acme", "messages": [{"role": "user", "content": "x"}], "stop": null, '
                      b'"seed": null, "n": null, "stream": null, "logprobs": null, "temperature": 0}', {})
    assert req.request.stop == () and req.request.seed is None and not req.request.do_sample


@pytest.mark.parametrize("model, headers, tenant, adapter", [
    ("acme", {}, "acme", None),
    ("acme", {"X-Tenant-ID": "acme"}, "acme", None),
    ("acme@v2", {}, "acme", "acme@v2"),
    ("base", {}, None, "base"),
    ("base", {"X-Tenant-ID": "acme"}, "acme", "base"),  # the tenant is still checked by the service
])
def test_model_names_tenant_pin_or_base(model, headers, tenant, adapter):
    req = parse(CHAT, {"model": model, "messages": MSGS}, headers)
    assert (req.request.tenant, req.request.adapter, req.model) == (tenant, adapter, model)


def test_model_and_header_must_agree():
    with pytest.raises(TenantConflict) as e:
        chat({"X-Tenant-ID": "other"})
    assert http_status(e.value)[0] == 400
    assert error_body(e.value)["error"]["message"] == "X-Tenant-ID header and 'model' name different tenants"
    with pytest.raises(TenantConflict):
        parse(CHAT, {"model": "acme@v1", "messages": MSGS}, {"X-Tenant-ID": "other"})


@pytest.mark.parametrize("model", ["../etc", "ACME", "a/b", "t\u0435nant"])
def test_model_is_a_valid_tenant_id(model):
    with pytest.raises(InvalidTenantId):
        parse(CHAT, {"model": model, "messages": MSGS}, {})


@pytest.mark.parametrize("fields, words", [
    ({"stream_options": {"include_usage": 1}}, "'stream_options' may only be"),
    ({"stream_options": {"other": True}}, "'stream_options' may only be"),
    ({"stream": "yes"}, "'stream' must be true or false"),
    ({"logprobs": 1}, "'logprobs' must be true or false"),
    ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
    ({"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be between 0 and 20"),
    ({"logprobs": True, "top_logprobs": True}, "'top_logprobs' must be an integer"),
    ({"logprobs": True, "top_logprobs": 1.5}, "'top_logprobs' must be an integer"),
    ({"n": 2}, "'n' must be 1"),
    ({"n": True}, "'n' must be 1"),
    ({"max_tokens": 3, "max_completion_tokens": 3}, "one of 'max_tokens' or 'max_completion_tokens'"),
    ({"max_tokens": 0}, "'max_tokens' must be between 1"),
    ({"temperature": -1}, "'temperature' must be in"),
    ({"temperature": float("nan")}, "finite"),
    ({"top_p": 2}, "'top_p'"),
    ({"seed": -1}, "'seed'"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "'stop'"),
    ({"frequency_penalty": 0.5, "user": "u"}, "unknown field(s): 'frequency_penalty', 'user'"),
    ({"prompt": "x"}, "unknown field(s): 'prompt'"),  # chat takes messages
    ({"model": ""}, "'model' is required"),
    ({"model": 5}, "'model' is required"),
    ({"model": "@v1"}, "'model' is required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "only text parts"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role must be one of"),
])
def test_bad_chat_requests_are_400_naming_the_problem(fields, words):
    with pytest.raises(InvalidRequest) as e:
        chat(**fields)
    assert http_status(e.value)[0] == 400
    assert words in error_body(e.value)["error"]["message"]


def test_completions_fields():
    assert comp(max_tokens=3).request.max_new_tokens == 3
    for fields, words in (({"messages": MSGS}, "unknown field(s): 'messages'"),
                          ({"logprobs": True}, "'logprobs' must be an integer"),
                          ({"logprobs": -1}, "'logprobs' must be between 0 and 20"),
                          ({"logprobs": 21}, "'logprobs' must be between 0 and 20"),
                          ({"logprobs": 2.0}, "'logprobs' must be an integer"),
                          ({"top_logprobs": 1}, "unknown field(s): 'top_logprobs'"),
                          ({"max_completion_tokens": 3}, "unknown field(s)"),
                          ({"prompt": ["a", "b"]}, "'prompt' must be a string"),
                          ({"prompt": ""}, "'prompt' is empty")):
        with pytest.raises(InvalidRequest) as e:
            comp(**fields)
        assert words in str(e.value)
    with pytest.raises(InvalidRequest, match="'prompt' is required"):
        parse(COMP, {"model": "acme"}, {})
    for endpoint, example in ((COMP, '"prompt": "Hello"'), (CHAT, '"messages": [{"role": "user"')):
        for body in (b"", "  ", None):
            with pytest.raises(InvalidRequest, match="body is empty") as e:
                parse(endpoint, body, {})
            assert example in str(e.value)


def test_text_content_parts_are_joined():
    req = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.request.messages == ({"role": "user", "content": "a\nb"},)


OURS = {"text": "Paris", "tenant": "acme", "adapter": "acme@v1", "fallback": None, "finish_reason": "stop",
        "usage": {"prompt_tokens": 7, "completion_tokens": 2}}


def test_chat_reply_shape():
    body = chat().reply(OURS, created=123)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["created"] == 123 and body["model"] == "acme"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Paris"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert body["loraplex"] == {"tenant": "acme", "task": None, "adapter": "acme@v1", "fallback": None}
    assert chat().reply(OURS)["id"] != body["id"]


def test_completion_reply_shape():
    req = parse(COMP, {"model": "base", "prompt": "x"}, {})
    body = completion_body(req, {**OURS, "tenant": None, "adapter": "base", "fallback": "no_tenant",
                                 "finish_reason": "length"})
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "base"
    assert body["choices"] == [{"index": 0, "text": "Paris", "logprobs": None, "finish_reason": "length"}]
    assert body["loraplex"]["fallback"] == "no_tenant"


# Our reply's `logprobs` for two tokens asked with `logprobs: 3`; "é" shows `bytes` is UTF-8.
OURS_LP = {**OURS, "text": "Paé", "logprobs": {
    "tokens": ["Pa", "é"], "token_logprobs": [-0.5, -1.25],
    "top_logprobs": [[{"token": "Pa", "logprob": -0.5}, {"token": "Lo", "logprob": -1.0}, {"token": "x", "logprob": -3.0}],
                     [{"token": "ris", "logprob": -0.75}, {"token": "é", "logprob": -1.25}, {"token": "y", "logprob": -4.0}]]}}


@pytest.mark.parametrize("fields, asked, shown", [
    ({}, 0, None), ({"logprobs": False}, 0, None), ({"logprobs": True}, 1, 0),
    ({"logprobs": True, "top_logprobs": 0}, 1, 0), ({"logprobs": True, "top_logprobs": 2}, 2, 2),
    ({"logprobs": True, "top_logprobs": 20}, 20, 20),
])
def test_chat_logprobs_fields(fields, asked, shown):
    req = chat(temperature=0, **fields)
    assert (req.request.logprobs, req.logprobs) == (asked, shown)
    if asked:  # the same request as our JSON API's `logprobs` field
        assert req.request == parse_request({"tenant": "acme", "messages": MSGS, "logprobs": asked}, {})


@pytest.mark.parametrize("fields, asked, shown", [
    ({}, 0, None), ({"logprobs": 0}, 1, 0), ({"logprobs": 5}, 5, 5), ({"logprobs": 20}, 20, 20)])
def test_completions_logprobs_fields(fields, asked, shown):
    req = comp(**fields)
    assert (req.request.logprobs, req.logprobs) == (asked, shown)


def test_chat_logprobs_reply_shape():
    body = chat(logprobs=True, top_logprobs=2).reply(OURS_LP)
    assert body["choices"][0]["logprobs"] == {"refusal": None, "content": [
        {"token": "Pa", "logprob": -0.5, "bytes": [80, 97], "top_logprobs": [
            {"token": "Pa", "logprob": -0.5, "bytes": [80, 97]}, {"token": "Lo", "logprob": -1.0, "bytes": [76, 111]}]},
        {"token": "é", "logprob": -1.25, "bytes": [0xC3, 0xA9], "top_logprobs": [
            {"token": "ris", "logprob": -0.75, "bytes": [114, 105, 115]},
            {"token": "é", "logprob": -1.25, "bytes": [0xC3, 0xA9]}]}]}
    assert chat(logprobs=True).reply(OURS_LP)["choices"][0]["logprobs"]["content"][1]["top_logprobs"] == []
    assert chat().reply(OURS_LP)["choices"][0]["logprobs"] is None  # not asked: not shown
    assert "logprobs" not in body["loraplex"]


def test_completion_logprobs_reply_shape():
    body = comp(logprobs=1).reply(OURS_LP)
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["Pa", "é"], "token_logprobs": [-0.5, -1.25],
        "top_logprobs": [{"Pa": -0.5}, {"ris": -0.75, "é": -1.25}],  # the k most likely and the chosen one
        "text_offset": [0, 2]}
    assert comp(logprobs=0).reply(OURS_LP)["choices"][0]["logprobs"]["top_logprobs"] == [{"Pa": -0.5}, {"é": -1.25}]
    assert comp(logprobs=5).reply(OURS_LP)["choices"][0]["logprobs"]["top_logprobs"][1] == {
        "ris": -0.75, "é": -1.25, "y": -4.0}
    assert comp().reply(OURS_LP)["choices"][0]["logprobs"] is None
    alike = {**OURS_LP, "logprobs": {"tokens": ["\ufffd"], "token_logprobs": [-2.0], "top_logprobs": [[
        {"token": "\ufffd", "logprob": -1.0}, {"token": "\ufffd", "logprob": -2.0}]]}}  # two byte pieces
    assert comp(logprobs=2).reply(alike)["choices"][0]["logprobs"]["top_logprobs"] == [{"\ufffd": -1.0}]


@pytest.mark.parametrize("exc, status, kind", [
    (InvalidRequest("bad 'max_new_tokens'"), 400, "invalid_request_error"),
    (TenantDisabled("acme"), 403, "permission_error"),
    (UnknownEndpoint("no endpoint"), 404, "not_found_error"),
    (RegistryUnavailable("redis://10.0.0.1:6379 refused"), 503, "server_error"),
    (RuntimeError("boom at 0xdead"), 500, "server_error"),
])
def test_error_shape_and_status_come_from_the_one_table(exc, status, kind):
    body = error_body(exc)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert http_status(exc)[0] == status and body["error"]["type"] == kind
    assert body["error"]["code"] == type(exc).__name__
    if status >= 500:
        assert "10.0.0.1" not in body["error"]["message"] and "0xdead" not in body["error"]["message"]
    if isinstance(exc, InvalidRequest):
        assert body["error"]["message"] == "bad 'max_tokens'"


def test_models():
    assert models_request(b"", {"X-Tenant-ID": "acme", "X-Tenant-Key": "k"}).tenant == "acme"
    assert models_request(None, {}).tenant is None and models_request("  ", {}).key is None
    with pytest.raises(InvalidRequest, match="takes no body"):
        models_request(b'{"x": 1}', {})
    with pytest.raises(InvalidTenantId):
        models_request(b"", {"X-Tenant-ID": "../x"})
    assert [m["id"] for m in models_body(None)["data"]] == ["base"]
    listed = models_body("acme")
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["base", "acme"]
    assert all(m["object"] == "model" and m["owned_by"] == openai_api.OWNED_BY for m in listed["data"])


@pytest.mark.parametrize("headers, path, lists", [
    ({}, "", False),
    ({"url_path": ""}, "", False),
    ({"url_path": "v1/chat/completions"}, "v1/chat/completions", False),
    ({"url_path": "v1/completions/"}, "v1/completions", False),
    ({"url_path": b"v1/models"}, "v1/models", True),
    ({"URL_PATH": "v1/models"}, "", False),  # a client's own header of another spelling is not the frontend's
])
def test_routes(headers, path, lists):
    route = route_for(headers)
    assert route.path == path and route.lists_models is lists


@pytest.mark.parametrize("path, openai_shape", [("v1/embeddings", True), ("admin", False), ("v1/../x", True)])
def test_unknown_path_is_404_naming_it(path, openai_shape):
    route = route_for({"url_path": path})
    with pytest.raises(UnknownEndpoint) as e:
        route.parse({"prompt": "x"}, {})
    assert http_status(e.value)[0] == 404 and repr(path) in str(e.value)
    body = route.error(e.value)
    assert isinstance(body["error"], dict) is openai_shape


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                     lambda children: st.lists(children, max_size=4)
                     | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=12)
_fields = st.sampled_from(["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
                           "top_p", "seed", "stop", "stream", "n", "logprobs", "top_logprobs", "user"])
_models = st.one_of(st.sampled_from(["acme", "base", "acme@v1", "@v1", "acme@", "a@b@c"]), st.text(max_size=12))


@settings(max_examples=400, deadline=None)
@given(endpoint=st.sampled_from([CHAT, COMP]),
       body=st.one_of(st.dictionaries(_fields, _json, max_size=6), st.fixed_dictionaries(
           {"model": _models, "messages": _json, "prompt": _json}), _json, st.binary(max_size=64)),
       tenant=st.one_of(st.none(), st.text(max_size=70)))
def test_fuzz_translation_returns_request_or_typed_4xx(endpoint, body, tenant):
    headers = {} if tenant is None else {"X-Tenant-ID": tenant}
    try:
        req = parse(endpoint, body, headers)
    except (RequestError, InvalidTenantId) as exc:
        code, _ = http_status(exc)
        assert 400 <= code < 500 and error_body(exc)["error"]["message"]
    else:
        assert (req.request.prompt is None) != (req.request.messages is None)
        json.dumps(req.reply(OURS))
