"""Streaming wire formats: how one request's text travels as HTTP chunks (`stream: true`).

    our JSON API, Content-Type application/x-ndjson: one JSON object and "\\n" per chunk
        {"text": "<piece>"}  (+ "logprobs": our shape for the piece's tokens, when asked)  ...
        {"text": "", "finish_reason", "usage", "tenant", "task", "adapter", "version", "version_by",
         "fallback", "route"}                                         last
        {"error": {"message", "type", "status"}}                      last, if it failed after the first chunk
    OpenAI, Content-Type text/event-stream: "data: <chunk>\\n\\n" per chunk
        chat.completion.chunk / text_completion objects (openai_api.py shapes them) ...
        the last one with finish_reason, usage and our "loraplex" fields, or {"error": {...}} (OpenAI's shape)
        then "data: [DONE]\\n\\n"

A request that fails before its first chunk gets the ordinary error reply (its status, a JSON
body), as without streaming; once a chunk went out the status is 200, so a later failure can only
be the last chunk. A reply that arrives whole (the static scheduler; a row whose text all came
at the end) is the same format with fewer chunks: its text as one chunk, then the last chunk.

One ChunkStream per request, used by one thread at a time (ts_entry's event loop, or the worker
thread in synchronous TorchServe). No TorchServe here: ts_entry sends what these return.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Mapping, Protocol

from . import openai_api
from .openai_api import OpenAIRequest

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
DONE = "data: [DONE]\n\n"
_FINAL_FIELDS = ("finish_reason", "usage", "tenant", "task", "adapter", "version", "version_by", "fallback", "route",
                 "chain")


class ChunkStream(Protocol):
    content_type: str
    started: bool  # a chunk went out: the status is 200 and errors can only be the last chunk

    def piece(self, text: str, logprobs: Mapping[str, Any] | None = None) -> str | None:
        """The chunk for new text (our `logprobs` shape for its tokens, or None); None = nothing to send."""

    def finish(self, status: int, body: Mapping[str, Any]) -> str:
        """What ends the stream, from the request's whole reply (status and exchange-rendered body):
        any text not streamed yet as one chunk, then the last chunk."""


def stream_for(exchange: Any) -> ChunkStream | None:
    """The chunk writer for a parsed request (routes.Exchange) that asked for `stream`; None if it did not."""
    if not exchange.request.stream:
        return None
    if isinstance(exchange, OpenAIRequest):
        return SseStream(exchange)
    return NdjsonStream()


class NdjsonStream:
    """Our JSON API's stream."""

    content_type = NDJSON

    def __init__(self) -> None:
        self.started = False
        self._sent = ""

    def piece(self, text: str, logprobs: Mapping[str, Any] | None = None) -> str | None:
        if not text and logprobs is None:
            return None
        chunk: dict[str, Any] = {"text": text}
        if logprobs is not None:
            chunk["logprobs"] = dict(logprobs)
        self.started, self._sent = True, self._sent + text
        return _line(chunk)

    def finish(self, status: int, body: Mapping[str, Any]) -> str:
        if status != 200:
            return _line({"error": {"message": body.get("error"), "type": body.get("type"),
                                    "status": body.get("status", status)}})
        rest = _unsent(self._sent, body["text"])
        head = ""
        if rest or not self.started:
            head = self.piece(rest, None if self.started else body.get("logprobs")) or _line({"text": ""})
        return head + _line({"text": "", **{k: body[k] for k in _FINAL_FIELDS if k in body}})


class SseStream:
    """The OpenAI endpoints' stream: every chunk shares one id and `created`."""

    content_type = SSE

    def __init__(self, req: OpenAIRequest, *, created: int | None = None) -> None:
        self._req = req
        self._id = openai_api.new_stream_id(req)
        self._created = int(time.time()) if created is None else created
        self._sent = ""
        self._offset = 0  # completions' text_offset: where the next piece's first token starts
        self.started = False

    def piece(self, text: str, logprobs: Mapping[str, Any] | None = None) -> str | None:
        shaped = openai_api.delta_logprobs(self._req, logprobs, self._offset)
        if not text and shaped is None:
            return None
        if logprobs is not None:
            self._offset += sum(len(t) for t in logprobs["tokens"])
        return self._send_text(text, shaped)

    def finish(self, status: int, body: Mapping[str, Any]) -> str:
        if status != 200:
            return _event(body) + DONE
        text, logprobs = openai_api.reply_text(self._req, body)
        rest = _unsent(self._sent, text)
        head = self._send_text(rest, None if self.started else logprobs) if rest or not self.started else ""
        last = openai_api.final_chunk_body(self._req, body, stream_id=self._id, created=self._created)
        return head + _event(last) + DONE

    def _send_text(self, text: str, shaped: dict | None) -> str:
        chunk = openai_api.chunk_body(self._req, text, shaped, stream_id=self._id, created=self._created,
                                      first=not self.started)
        self.started, self._sent = True, self._sent + text
        return _event(chunk)


def _unsent(sent: str, text: str) -> str:
    """The part of a reply's text the stream has not carried yet."""
    if text.startswith(sent):
        return text[len(sent):]
    log.warning("streamed text (%d chars) is not a prefix of the reply's (%d chars); the rest is not sent",
                len(sent), len(text))
    return ""


def _line(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _event(obj: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
