"""The request parser returns a validated request or a typed 4xx error, never anything else."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handler.errors import InvalidRequest, RequestError, TenantConflict, http_status
from handler.request import parse_request
from tenant_registry.errors import InvalidTaskName, InvalidTenantId

H = {"X-Tenant-ID": "acme"}


def test_prompt_request_with_all_fields():
    req = parse_request({"prompt": "hi", "max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9,
                         "do_sample": True, "seed": 3, "stop": ["\n"], "adapter": "base"}, H)
    assert (req.tenant, req.prompt, req.max_new_tokens, req.temperature, req.top_p) == ("acme", "hi", 5, 0.7, 0.9)
    assert req.do_sample and req.seed == 3 and req.stop == ("\n",) and req.adapter == "base"


def test_header_lookup_is_case_insensitive_and_body_tenant_works():
    assert parse_request({"prompt": "x"}, {"x-tenant-id": "t1"}).tenant == "t1"
    assert parse_request({"prompt": "x", "tenant": "t2"}, {}).tenant == "t2"
    assert parse_request({"prompt": "x"}, {}).tenant is None


def test_raw_bytes_and_text_bodies_are_decoded():
    assert parse_request(b'{"prompt": "x"}', H).prompt == "x"
    assert parse_request('{"messages": [{"role": "user", "content": "x"}]}', H).messages[0]["content"] == "x"


@pytest.mark.parametrize("body, needle", [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (None, "JSON object"),
    ([1, 2], "JSON object, got array"),
    ({"prompt": 5}, "'prompt' must be a string"),
    ({"prompt": ""}, "'prompt' is empty"),
    ({"prompt": "   "}, "'prompt' is empty"),
    ({}, "exactly one of"),
    ({"prompt": "x", "messages": []}, "exactly one of"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role must be one of"),
    ({"messages": [{"role": "user"}]}, "exactly 'role' and 'content'"),
    ({"prompt": "x", "max_new_tokens": 0}, "'max_new_tokens' must be between"),
    ({"prompt": "x", "max_new_tokens": "5"}, "'max_new_tokens' must be an integer"),
    ({"prompt": "x", "max_new_tokens": True}, "'max_new_tokens' must be an integer"),
    ({"prompt": "x", "temperature": -1}, "'temperature' must be in"),
    ({"prompt": "x", "temperature": 0}, "'temperature' must be in"),
    ({"prompt": "x", "temperature": 1e9}, "'temperature' must be in"),
    ({"prompt": "x", "temperature": math.nan}, "finite"),
    ({"prompt": "x", "top_p": 1.5}, "'top_p' must be in"),
    ({"prompt": "x", "do_sample": "yes"}, "'do_sample' must be true or false"),
    ({"prompt": "x", "seed": -1}, "'seed' must be between"),
    ({"prompt": "x", "stop": [""]}, "'stop' entry"),
    ({"prompt": "x", "stop": ["a"] * 10}, "'stop' must be"),
    ({"prompt": "x", "adapter": 3}, "'adapter' must be"),
    ({"prompt": "x", "evil": 1}, "unknown field(s): 'evil'"),
])
def test_bad_bodies_get_400_naming_the_problem(body, needle):
    with pytest.raises(InvalidRequest) as info:
        parse_request(body, H)
    assert needle in str(info.value)
    assert http_status(info.value)[0] == 400


@pytest.mark.parametrize("tenant", ["../etc", "a/b", "a\x00b", "x" * 10_000, "аcme", "ACME", "-lead", ""])
def test_hostile_tenant_ids_are_refused_or_treated_as_absent(tenant):
    if tenant == "":
        assert parse_request({"prompt": "x"}, {"X-Tenant-ID": ""}).tenant is None
        return
    with pytest.raises(InvalidTenantId) as info:
        parse_request({"prompt": "x"}, {"X-Tenant-ID": tenant})
    assert http_status(info.value)[0] == 400


def test_header_and_body_tenant_must_agree():
    with pytest.raises(TenantConflict):
        parse_request({"prompt": "x", "tenant": "other"}, H)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                     lambda children: st.lists(children, max_size=4)
                     | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=12)
_fields = st.sampled_from(["prompt", "messages", "tenant", "task", "max_new_tokens", "temperature", "top_p",
                           "do_sample", "seed", "stop", "adapter", "other"])


@settings(max_examples=400, deadline=None)
@given(body=st.one_of(st.dictionaries(_fields, _json, max_size=6), _json, st.binary(max_size=64),
                      st.text(max_size=64)),
       tenant=st.one_of(st.none(), st.text(max_size=70)))
def test_fuzz_parser_returns_request_or_typed_4xx(body, tenant):
    headers = {} if tenant is None else {"X-Tenant-ID": tenant}
    try:
        req = parse_request(body, headers)
    except (RequestError, InvalidTenantId, InvalidTaskName) as exc:
        code, _ = http_status(exc)
        assert 400 <= code < 500 and str(exc)
    else:
        assert (req.prompt is None) != (req.messages is None)
        json.dumps({"t": req.tenant, "p": req.prompt})  # the request is plain data


@pytest.mark.parametrize("headers", [
    {"X-Tenant-ID": "acme", "x-tenant-id": "other"},
    {"X-Tenant-ID": "acme", "X-TENANT-ID": "acme"},
    {b"X-Tenant-ID": b"acme", "x-tenant-id": "other"},
    {"X-Tenant-ID": "acme", "X-Tenant-Key": "a", "x-tenant-key": "b"},
])
def test_a_header_sent_twice_is_ambiguous_400(headers):
    with pytest.raises(InvalidRequest) as info:
        parse_request({"prompt": "x"}, headers)
    assert "more than once" in str(info.value) and http_status(info.value)[0] == 400


def test_empty_body_says_so():
    """GET/DELETE on /predictions reach the handler with an empty body (TorchServe does not pass
    the method on): the message says what to send."""
    for body in (b"", "", bytearray()):
        with pytest.raises(InvalidRequest) as info:
            parse_request(body, H)
        assert "empty" in str(info.value) and "POST" in str(info.value)


def test_input_part_content_types_are_not_headers():
    """TorchServe puts {"content-type": ...} under each input part's name in the same dict as the
    headers (a gRPC input or form field named X-Tenant-ID): not a tenant header."""
    req = parse_request({"prompt": "x"}, {"x-tenant-id": {"content-type": ""}, "X-Tenant-ID": "acme"})
    assert req.tenant == "acme"
    assert parse_request({"prompt": "x"}, {"X-Tenant-ID": {"content-type": "text/plain"}}).tenant is None
