"""The OpenAI-compatible API (chat/completions, completions, models), translated to and from our
JSON API. Pure translation: no TorchServe, no registry, no engine.

    OpenAI body ─► our field names ─► request.request_from_fields (the one home of every field rule)
                                       ─► the same validated InferenceRequest our JSON API produces
    our reply body ─► chat.completion / text_completion (our extra fields under "loraplex")
    any error ─► {"error": {message, type, param, code}} with the status of errors.py's one table

`model` names who is served: "<tenant>" (its current adapter), "<tenant>:<task>" (the current
adapter of one of its tasks, our `task` field), "<tenant>@v<N>" / "<tenant>:<task>@v<N>" (a pin of
one of its own versions, our `adapter` field) or "base" (the base model; the tenant, if any, comes
from X-Tenant-ID and is checked as for any request). A tenant (task) named in `model` must agree
with X-Tenant-ID (X-Task), as our `tenant` (`task`) field must. `_tenant_fields` is the one parse.

Sampling follows OpenAI: `temperature: 0` is greedy; any other temperature, or none (OpenAI's
default is 1), samples. `stream: true` becomes our `stream` field; the chunks
(chat.completion.chunk / text_completion objects) are shaped here by `chunk_body` and
`final_chunk_body`, and framed as server-sent events by stream_format.py. The last chunk always
carries `usage` (as with OpenAI's `stream_options: {"include_usage": true}`, which is accepted).

Log-probabilities: chat `logprobs: true` (+ `top_logprobs: 0..20`), completions `logprobs: k`
(OpenAI's legacy cap is 5; we accept up to MAX_LOGPROBS) become our `logprobs` field (at least 1:
the engine returns a token's own log-probability only with its top alternatives); the reply trims
the alternatives back to what was asked and reshapes our `logprobs` into OpenAI's objects.

Pure functions of their inputs (plus the clock for `created` and a random `id`): any thread.
"""
from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tenant_registry.ids import DEFAULT_TASK

from . import errors
from .errors import InvalidRequest
from .request import (
    BASE,
    InferenceRequest,
    caller,
    decode_body,
    json_type,
    logprobs_count,
    refuse_unknown_fields,
    request_from_fields,
)

OWNED_BY = "loraplex"


class Endpoint(enum.Enum):
    """The OpenAI endpoints, by TorchServe's `url_path` (what follows /predictions/<model>/<version>/)."""

    CHAT = "v1/chat/completions"
    COMPLETIONS = "v1/completions"
    MODELS = "v1/models"


_SHARED = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
                     "logprobs"})
_FIELDS = {
    Endpoint.CHAT: _SHARED | {"messages", "max_completion_tokens", "top_logprobs"},
    Endpoint.COMPLETIONS: _SHARED | {"prompt"},
}
_EXAMPLE = {Endpoint.CHAT: '{"model": "base", "messages": [{"role": "user", "content": "Hello"}]}',
            Endpoint.COMPLETIONS: '{"model": "base", "prompt": "Hello"}'}
_TEXT_FIELD = {Endpoint.CHAT: "messages", Endpoint.COMPLETIONS: "prompt"}

# Our field names in messages -> what an OpenAI caller sent (the only renaming of a message).
_RENAMES = (("'max_new_tokens'", "'max_tokens'"), ("body field 'tenant'", "'model'"),
            ("body field 'task'", "'model'"))

# HTTP status (from errors.py's one table) -> OpenAI's error `type`.
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 413: "invalid_request_error"}


@dataclass(frozen=True)
class OpenAIRequest:
    """One validated chat or completions request: our InferenceRequest plus what the reply echoes."""

    endpoint: Endpoint
    model: str
    request: InferenceRequest
    logprobs: int | None = None  # alternatives per token the reply shows (None: no logprobs asked)

    def reply(self, body: Mapping[str, Any], *, created: int | None = None) -> dict:
        return completion_body(self, body, created=created)

    @staticmethod
    def error(exc: BaseException) -> dict:
        return error_body(exc)


def parse(endpoint: Endpoint, body: Any, headers: Mapping[str, str]) -> OpenAIRequest:
    """Validate one chat or completions request; raises a RequestError (errors.py) naming the field."""
    if endpoint not in _FIELDS:
        raise ValueError(f"{endpoint} takes no completion body")
    if _is_empty(body):
        raise InvalidRequest(f"body is empty; POST a JSON object such as {_EXAMPLE[endpoint]}")
    data = decode_body(body)
    refuse_unknown_fields(data, _FIELDS[endpoint])
    data = {k: v for k, v in data.items() if v is not None}  # OpenAI treats null as "not sent"
    _refuse_not_available(data)
    model = data.get("model")
    if not isinstance(model, str) or not model or model.startswith("@"):
        raise InvalidRequest("'model' is required: \"<tenant>\", \"<tenant>:<task>\", \"<tenant>@v<N>\" or \"base\"")
    fields: dict[str, Any] = _tenant_fields(model)
    text_field = _TEXT_FIELD[endpoint]
    if text_field not in data:
        raise InvalidRequest(f"'{text_field}' is required")
    fields[text_field] = _messages(data["messages"]) if endpoint is Endpoint.CHAT else data["prompt"]
    if "max_tokens" in data and "max_completion_tokens" in data:
        raise InvalidRequest("send one of 'max_tokens' or 'max_completion_tokens'")
    for name in ("max_tokens", "max_completion_tokens"):
        if name in data:
            fields["max_new_tokens"] = data[name]
    temperature = data.get("temperature")
    if _is_zero(temperature):
        fields["do_sample"] = False
    else:
        fields["do_sample"] = True
        if temperature is not None:
            fields["temperature"] = temperature
    for name in ("top_p", "seed", "stop", "stream"):
        if name in data:
            fields[name] = data[name]
    logprobs = _logprobs_asked(endpoint, data)
    if logprobs is not None:
        fields["logprobs"] = max(logprobs, 1)
    return OpenAIRequest(endpoint, model, request_from_fields(fields, headers), logprobs)


def models_request(body: Any, headers: Mapping[str, str]) -> InferenceRequest:
    """`v1/models` (a GET: TorchServe hands it on as an empty body): the caller's tenant and key only,
    so the service checks them exactly as for a completion before listing anything."""
    if not _is_empty(body):
        raise InvalidRequest("v1/models takes no body; send a GET")
    tenant, key = caller(headers)
    return InferenceRequest(tenant=tenant, prompt=None, messages=None, max_new_tokens=None, temperature=1.0,
                            top_p=1.0, do_sample=False, seed=None, stop=(), adapter=None, key=key)


def models_body(tenant: str | None, tasks: Sequence[str] = ()) -> dict:
    """What a caller may name in `model`: "base", and its own tenant when it named one that is served
    with an adapter ("<tenant>" for its default task, "<tenant>:<task>" for each other task). Never
    other tenants: listing them would tell any caller who else is served."""
    ids = [BASE] + ([tenant] if tenant else [])
    ids += [f"{tenant}:{task}" for task in tasks if tenant and task != DEFAULT_TASK]
    return {"object": "list",
            "data": [{"id": i, "object": "model", "created": 0, "owned_by": OWNED_BY} for i in ids]}


def completion_body(req: OpenAIRequest, body: Mapping[str, Any], *, created: int | None = None) -> dict:
    """Our JSON API's reply body -> OpenAI's chat.completion / text_completion object."""
    choice: dict[str, Any] = {"index": 0}
    if req.endpoint is Endpoint.CHAT:
        kind, prefix = "chat.completion", "chatcmpl-"
        choice["message"] = {"role": "assistant", "content": body["text"]}
    else:
        kind, prefix = "text_completion", "cmpl-"
        choice["text"] = body["text"]
    logprobs = None
    if req.logprobs is not None and "logprobs" in body:
        shape = _chat_logprobs if req.endpoint is Endpoint.CHAT else _completion_logprobs
        logprobs = shape(body["logprobs"], req.logprobs)
    choice.update(logprobs=logprobs, finish_reason=body["finish_reason"])
    usage = body["usage"]
    return {
        "id": prefix + secrets.token_hex(12),
        "object": kind,
        "created": int(time.time()) if created is None else created,
        "model": req.model,
        "choices": [choice],
        "usage": {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                  "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
        "loraplex": {"tenant": body["tenant"], "task": body.get("task"), "adapter": body["adapter"],
                     **{k: body[k] for k in ("version", "version_by") if k in body},  # the served version
                     **({"route": body["route"]} if "route" in body else {}),  # which task and why (task_router.py)
                     "fallback": body["fallback"], **({"chain": body["chain"]} if "chain" in body else {})},
    }


def new_stream_id(req: OpenAIRequest) -> str:
    """The id every chunk of one stream shares (OpenAI's prefixes, as `completion_body`)."""
    return ("chatcmpl-" if req.endpoint is Endpoint.CHAT else "cmpl-") + secrets.token_hex(12)


def chunk_body(req: OpenAIRequest, text: str, logprobs: dict | None, *, stream_id: str, created: int,
               first: bool) -> dict:
    """One streamed piece of text: a chat.completion.chunk (`delta`; the stream's first chunk also
    names the role) or a text_completion chunk. `logprobs` is already in OpenAI's shape for this
    endpoint (`delta_logprobs`), or None."""
    choice: dict[str, Any] = {"index": 0}
    if req.endpoint is Endpoint.CHAT:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        choice["text"] = text
    choice.update(logprobs=logprobs, finish_reason=None)
    return _chunk(req, choice, stream_id=stream_id, created=created)


def final_chunk_body(req: OpenAIRequest, body: Mapping[str, Any], *, stream_id: str, created: int) -> dict:
    """The stream's last chunk, from the whole reply (`completion_body`'s object): no text,
    `finish_reason`, `usage` and our `loraplex` fields."""
    choice: dict[str, Any] = {"index": 0}
    if req.endpoint is Endpoint.CHAT:
        choice["delta"] = {}
    else:
        choice["text"] = ""
    choice.update(logprobs=None, finish_reason=body["choices"][0]["finish_reason"])
    return {**_chunk(req, choice, stream_id=stream_id, created=created), "usage": dict(body["usage"]),
            "loraplex": dict(body["loraplex"])}


def reply_text(req: OpenAIRequest, body: Mapping[str, Any]) -> tuple[str, dict | None]:
    """The text and OpenAI-shaped logprobs of a whole reply (`completion_body`'s object)."""
    choice = body["choices"][0]
    text = choice["message"]["content"] if req.endpoint is Endpoint.CHAT else choice["text"]
    return text, choice.get("logprobs")


def delta_logprobs(req: OpenAIRequest, ours: Mapping[str, Any] | None, text_offset: int) -> dict | None:
    """Our `logprobs` for the tokens of one streamed piece -> OpenAI's shape (None when the caller
    asked for none). `text_offset`: where the piece starts in the returned text (completions)."""
    if req.logprobs is None or ours is None:
        return None
    if req.endpoint is Endpoint.CHAT:
        return _chat_logprobs(ours, req.logprobs)
    return _completion_logprobs(ours, req.logprobs, start=text_offset)


def _chunk(req: OpenAIRequest, choice: dict, *, stream_id: str, created: int) -> dict:
    kind = "chat.completion.chunk" if req.endpoint is Endpoint.CHAT else "text_completion"
    return {"id": stream_id, "object": kind, "created": created, "model": req.model, "choices": [choice]}


def error_body(exc: BaseException) -> dict:
    """OpenAI's error shape; the status, the message and the 5xx wording are errors.py's."""
    ours = errors.error_body(exc)
    message = ours["error"]
    for mine, theirs in _RENAMES:
        message = message.replace(mine, theirs)
    status = ours["status"]
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": ours["type"]}}


def _refuse_not_available(data: Mapping[str, Any]) -> None:
    options = data.get("stream_options", {})
    if not isinstance(options, dict) or not set(options) <= {"include_usage"} \
            or not isinstance(options.get("include_usage", True), bool):
        raise InvalidRequest("'stream_options' may only be {\"include_usage\": true|false} "
                             "(the last chunk carries usage either way)")
    n = data.get("n", 1)
    if isinstance(n, bool) or n != 1:
        raise InvalidRequest("'n' must be 1 on this server (one choice per request)")


def _logprobs_asked(endpoint: Endpoint, data: Mapping[str, Any]) -> int | None:
    """How many alternatives per token the caller asked to see; None when it asked for no logprobs.
    Chat: `logprobs: true` and `top_logprobs` (default 0); completions: `logprobs: k`."""
    if endpoint is Endpoint.COMPLETIONS:
        return logprobs_count(data, "logprobs") if "logprobs" in data else None
    wanted = data.get("logprobs", False)
    if not isinstance(wanted, bool):
        raise InvalidRequest(f"'logprobs' must be true or false, got {json_type(wanted)}")
    top = logprobs_count(data, "top_logprobs") if "top_logprobs" in data else 0
    if not wanted:
        if "top_logprobs" in data:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true")
        return None
    return top


def _chat_logprobs(ours: Mapping[str, Any], k: int) -> dict:
    """Our `logprobs` -> OpenAI chat's `choices[0].logprobs` (ChatCompletionTokenLogprob entries)."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = [{**entry(token, logprob), "top_logprobs": [entry(a["token"], a["logprob"]) for a in top[:k]]}
               for token, logprob, top in zip(ours["tokens"], ours["token_logprobs"], ours["top_logprobs"])]
    return {"content": content, "refusal": None}


def _completion_logprobs(ours: Mapping[str, Any], k: int, start: int = 0) -> dict:
    """Our `logprobs` -> OpenAI's legacy completions `choices[0].logprobs`. As OpenAI documents, each
    step's `top_logprobs` holds the k most likely tokens and the chosen one (up to k + 1 entries);
    `text_offset` is each token's offset in the returned text (the tokens' strings laid end to end,
    from `start`: where a streamed piece begins).
    Two alternatives that read alike (byte pieces of one character both read "\ufffd") keep the
    more likely one's value."""
    tops, offsets, at = [], [], start
    for token, logprob, top in zip(ours["tokens"], ours["token_logprobs"], ours["top_logprobs"]):
        step: dict[str, float] = {}
        for alt in top[:k]:
            step.setdefault(alt["token"], alt["logprob"])
        step.setdefault(token, logprob)
        tops.append(step)
        offsets.append(at)
        at += len(token)
    return {"tokens": list(ours["tokens"]), "token_logprobs": list(ours["token_logprobs"]),
            "top_logprobs": tops, "text_offset": offsets}


def _tenant_fields(model: str) -> dict[str, Any]:
    """`model` -> our `tenant` / `task` / `adapter` fields (validated by request.py like our own):
    "acme" -> tenant; "acme:summarize" -> tenant + task; "acme@v2" / "acme:summarize@v2" -> tenant
    (+ task) + the pin."""
    if model == BASE:
        return {"adapter": BASE}
    name, at, _ = model.partition("@")
    tenant, colon, task = name.partition(":")
    fields: dict[str, Any] = {"tenant": tenant}
    if colon:
        fields["task"] = task
    if at:
        fields["adapter"] = model
    return fields


def _messages(messages: Any) -> Any:
    """OpenAI content may be a list of parts; text parts are joined into our one string. Everything
    else (roles, the shape of each message) is checked by request.py."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                       and isinstance(p["text"], str) for p in parts):
                raise InvalidRequest(f"messages[{i}].content: only text parts "
                                     "({\"type\": \"text\", \"text\": ...}) are supported")
            m = {**m, "content": "\n".join(p["text"] for p in parts)}
        out.append(m)
    return out


def _is_zero(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0


def _is_empty(body: Any) -> bool:
    if body is None or body == {}:
        return True
    if isinstance(body, (bytes, bytearray)):
        return not bytes(body).strip()
    return isinstance(body, str) and not body.strip()
