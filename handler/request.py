"""Turn one raw TorchServe request (headers + body) into a typed `InferenceRequest`.

Why strict: everything a tenant sends is hostile until proven otherwise. The
parser either returns a fully validated request or raises a `RequestError`
subclass whose message names the field; it never raises anything else (a
hypothesis fuzz test holds it to that), so one bad request can never take down
the batch.

Pure function of its inputs: safe to call from any thread.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from tenant_registry.ids import validate_task, validate_tenant_id
from tenant_registry.keys import MAX_KEY_CHARS

from .engine.api import MAX_LOGPROBS
from .errors import InvalidRequest, TenantConflict

TENANT_HEADER = "x-tenant-id"
KEY_HEADER = "x-tenant-key"
TASK_HEADER = "x-task"
USER_HEADER = "x-user-id"  # the end user, for sticky A/B splits (handler/ab_split.py)
MAX_USER_ID_CHARS = 128
BASE = "base"

_ALLOWED_FIELDS = frozenset({"prompt", "messages", "tenant", "task", "max_new_tokens", "temperature", "top_p",
                             "do_sample", "seed", "stop", "adapter", "logprobs", "stream", "compare"})
_ROLES = frozenset({"system", "user", "assistant"})
MAX_PROMPT_CHARS = 200_000  # a cheap bound before tokenising; the token limit is checked later
MAX_MESSAGES = 256
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_TEMPERATURE = 5.0
MAX_SEED = 2**32 - 1
ALL_VERSIONS = "all_versions"  # compare every version of the request's task (handler/fanout.py)
MAX_COMPARE_ENTRIES = 64  # a cheap bound before planning; the config's max_fanout_rows is checked there


@dataclass(frozen=True)
class InferenceRequest:
    """A validated request. `adapter` is None (the tenant's current adapter),
    "base", or an explicit `<tenant>@v<N>` / `<tenant>:<task>@v<N>` of the caller's own.
    `task` is the task the caller named (X-Task or the `task` field), None when it named none
    (the service's planning decides what that means: `LoraplexService._task_record`)."""

    tenant: str | None
    prompt: str | None
    messages: tuple[Mapping[str, str], ...] | None
    max_new_tokens: int | None
    temperature: float
    top_p: float
    do_sample: bool
    seed: int | None
    stop: tuple[str, ...]
    adapter: str | None
    logprobs: int = 0  # 0 = none; k >= 1 = each returned token's log-probability and its top k
    key: str | None = None  # X-Tenant-Key as presented; checked against the registry's salted hash
    stream: bool = False  # send the text as it is produced (ts_entry/stream_format.py write the chunks)
    task: str | None = None  # a valid task name (ids.validate_task) or None
    compare: tuple[str, ...] | str | None = None  # compare mode: entries, "all_versions", or None (handler/fanout.py)
    user_id: str | None = None  # X-User-ID: 1-128 printable characters; same user -> same split version

    def __repr__(self) -> str:  # never print the key
        return (f"InferenceRequest(tenant={self.tenant!r}, task={self.task!r}, adapter={self.adapter!r}, "
                f"key={'***' if self.key else None})")


def parse_request(body: Any, headers: Mapping[str, str]) -> InferenceRequest:
    """Validate one request. `body` is what TorchServe hands over: a dict (already
    decoded JSON), bytes/bytearray or str (raw payload)."""
    return request_from_fields(decode_body(body), headers)


def request_from_fields(data: Mapping[str, Any], headers: Mapping[str, str]) -> InferenceRequest:
    """Validate fields named as this API names them: the one home of every field rule, shared by
    the JSON API and the OpenAI-compatible one (handler/openai_api.py translates its fields first)."""
    data = dict(data)
    refuse_unknown_fields(data, _ALLOWED_FIELDS)
    tenant = _tenant(data, headers)
    prompt, messages = _prompt_or_messages(data)
    do_sample = _bool(data, "do_sample", False)
    temperature = _float(data, "temperature", 1.0, low=0.0, high=MAX_TEMPERATURE, low_open=True)
    top_p = _float(data, "top_p", 1.0, low=0.0, high=1.0, low_open=True)
    max_new = data.get("max_new_tokens")
    if max_new is not None:
        max_new = _int(data, "max_new_tokens", low=1, high=1_000_000)
    seed = _int(data, "seed", low=0, high=MAX_SEED) if data.get("seed") is not None else None
    logprobs = logprobs_count(data, "logprobs") if "logprobs" in data else 0
    return InferenceRequest(tenant=tenant, prompt=prompt, messages=messages, max_new_tokens=max_new,
                            temperature=temperature, top_p=top_p, do_sample=do_sample, seed=seed,
                            stop=_stops(data), adapter=_adapter(data), logprobs=logprobs, key=_key(headers),
                            stream=_bool(data, "stream", False), task=_task(data, headers, tenant),
                            user_id=_user_id(headers),
                            compare=_compare(data, tenant))


def logprobs_count(data: Mapping[str, Any], name: str) -> int:
    """The one rule for how many log-probability alternatives a request may ask for per token:
    an integer 0..MAX_LOGPROBS (the OpenAI API's `top_logprobs` / `logprobs` use it too)."""
    return _int(dict(data), name, low=0, high=MAX_LOGPROBS)


def refuse_unknown_fields(data: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(repr(k)[:40] for k in unknown[:5])}; "
                             f"allowed: {', '.join(sorted(allowed))}")


def caller(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(tenant, key) named by the headers alone, validated as for any request."""
    return _tenant({}, headers), _key(headers)


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup (TorchServe forwards names as the client sent them).

    A header present more than once is ambiguous (a proxy in front may have checked the
    other copy): InvalidRequest (400). TorchServe's frontend keeps only the last of copies
    spelt alike (`X-Tenant-ID` twice); copies spelt differently (`x-tenant-id`) reach us as
    separate entries and are refused here."""
    wanted = name.lower()
    found: list[str] = []
    for key, value in headers.items():
        if isinstance(value, Mapping):  # TorchServe files each input part's content type here: not a header
            continue
        k = key.decode("utf-8", "replace") if isinstance(key, (bytes, bytearray)) else str(key)
        if k.lower() == wanted:
            found.append(value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value))
    if len(found) > 1:
        raise InvalidRequest(f"header {name} was sent more than once; send it once")
    return found[0] if found else None


def _key(headers: Mapping[str, str]) -> str | None:
    key = header(headers, KEY_HEADER)
    if key is None or key == "":
        return None
    if len(key) > MAX_KEY_CHARS:  # not a key we issued; refuse before hashing anything
        raise InvalidRequest(f"X-Tenant-Key is longer than {MAX_KEY_CHARS} characters")
    return key


def _user_id(headers: Mapping[str, str]) -> str | None:
    """X-User-ID: an opaque end-user id (hashed, never stored), or None when absent or empty."""
    user = header(headers, USER_HEADER)
    if user is None or user == "":
        return None
    if len(user) > MAX_USER_ID_CHARS or not user.isprintable():
        raise InvalidRequest(f"X-User-ID must be 1-{MAX_USER_ID_CHARS} printable characters")
    return user


def decode_body(body: Any) -> dict:
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("body is not UTF-8 text; send a JSON object") from None
    if isinstance(body, str):
        if not body.strip():
            raise InvalidRequest("body is empty; POST a JSON object such as {\"prompt\": \"Hello\"}")
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidRequest("body is not valid JSON; send a JSON object such as "
                                 '{"prompt": "Hello"}') from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"body must be a JSON object, got {json_type(body)}")
    return body


def _header_or_field(data: dict, headers: Mapping[str, str], header_name: str, shown: str, field: str,
                     what: str) -> str | None:
    """One name a request may give by header (`shown` in messages) or body field (both: they must
    agree); "" = none."""
    from_header = header(headers, header_name)
    from_body = data.get(field)
    if from_body is not None and not isinstance(from_body, str):
        raise InvalidRequest(f"'{field}' must be a string, got {json_type(from_body)}")
    if from_header is not None and from_body is not None and from_header != from_body:
        raise TenantConflict(f"{shown} header and body field '{field}' name different {what}")
    value = from_header if from_header is not None else from_body
    return None if value is None or value == "" else value


def _tenant(data: dict, headers: Mapping[str, str]) -> str | None:
    tenant = _header_or_field(data, headers, TENANT_HEADER, "X-Tenant-ID", "tenant", "tenants")
    if tenant is not None:
        validate_tenant_id(tenant)  # InvalidTenantId (400) naming the rule
    return tenant


def _task(data: dict, headers: Mapping[str, str], tenant: str | None) -> str | None:
    """X-Task or the body's `task` (they must agree); a task without a tenant is refused."""
    task = _header_or_field(data, headers, TASK_HEADER, "X-Task", "task", "tasks")
    if task is None:
        return None
    validate_task(task)  # InvalidTaskName (400) naming the rule
    if tenant is None:
        raise InvalidRequest("a task (X-Task or 'task') needs a tenant: name one with X-Tenant-ID or 'tenant'")
    return task


def _prompt_or_messages(data: dict) -> tuple[str | None, tuple[Mapping[str, str], ...] | None]:
    has_prompt, has_messages = "prompt" in data, "messages" in data
    if has_prompt == has_messages:
        raise InvalidRequest("send exactly one of 'prompt' (a string) or 'messages' (a list of "
                             "{role, content})")
    if has_prompt:
        prompt = data["prompt"]
        if not isinstance(prompt, str):
            raise InvalidRequest(f"'prompt' must be a string, got {json_type(prompt)}")
        _check_text("prompt", prompt)
        return prompt, None
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"'messages' has {len(messages)} entries; at most {MAX_MESSAGES}")
    out = []
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise InvalidRequest(f"messages[{i}] must be an object with exactly 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in _ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {sorted(_ROLES)}")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string, got {json_type(content)}")
        total += len(content)
        out.append({"role": role, "content": content})
    if total > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"messages hold {total} characters; at most {MAX_PROMPT_CHARS}")
    if not any(m["content"].strip() for m in out):
        raise InvalidRequest("'messages' hold no text")
    return None, tuple(out)


def _check_text(name: str, text: str) -> None:
    if not text.strip():
        raise InvalidRequest(f"'{name}' is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"'{name}' has {len(text)} characters; at most {MAX_PROMPT_CHARS}")
    if "\x00" in text:
        raise InvalidRequest(f"'{name}' contains a NUL character")


def _bool(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false, got {json_type(value)}")
    return value


def _int(data: dict, name: str, *, low: int, high: int) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer, got {json_type(value)}")
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}, got {value}")
    return value


def _float(data: dict, name: str, default: float, *, low: float, high: float, low_open: bool) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"'{name}' must be a number, got {json_type(value)}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise InvalidRequest(f"'{name}' must be a finite number")
    if (value <= low if low_open else value < low) or value > high:
        lo = "(" if low_open else "["
        raise InvalidRequest(f"'{name}' must be in {lo}{low}, {high}], got {value}")
    return value


def _stops(data: dict) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOPS:
        raise InvalidRequest(f"'stop' must be a string or a list of at most {MAX_STOPS} strings")
    for s in stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(f"each 'stop' entry must be a non-empty string of at most "
                                 f"{MAX_STOP_CHARS} characters")
    return tuple(stop)


def _compare(data: dict, tenant: str | None) -> tuple[str, ...] | str | None:
    """Compare mode: a list of distinct entries ("base", "v2", "summarize@v1", ...) or "all_versions";
    what each names is checked in the planning (handler/fanout.py), after the tenant's checks."""
    compare = data.get("compare")
    if compare is None:
        return None
    shape = "'compare' must be a non-empty list of strings (\"base\", \"v2\", \"<task>@vN\", ...) or \"all_versions\""
    if compare != ALL_VERSIONS:
        if not isinstance(compare, list) or not compare or len(compare) > MAX_COMPARE_ENTRIES:
            raise InvalidRequest(f"{shape}, at most {MAX_COMPARE_ENTRIES} entries")
        if not all(isinstance(e, str) and 0 < len(e) <= 100 for e in compare):
            raise InvalidRequest(f"{shape}, each of 1-100 characters")
        if len(set(compare)) != len(compare):
            raise InvalidRequest("'compare' names an entry twice")
        compare = tuple(compare)
    if tenant is None:
        raise InvalidRequest("'compare' needs a tenant: name one with X-Tenant-ID or 'tenant'")
    if data.get("adapter") is not None:
        raise InvalidRequest("send either 'adapter' or 'compare', not both (compare names the versions itself)")
    if data.get("stream") is True:
        raise InvalidRequest("'compare' cannot stream: its rows' answers come together in one reply; "
                             "send \"stream\": false")
    return compare


def _adapter(data: dict) -> str | None:
    adapter = data.get("adapter")
    if adapter is None:
        return None
    if not isinstance(adapter, str) or not adapter or len(adapter) > 100:
        raise InvalidRequest("'adapter' must be \"base\" or one of your own adapter versions "
                             "such as \"acme@v2\" or \"acme:summarize@v2\"")
    return adapter


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
