"""The streaming wire formats (handler/stream_format.py), pure. The OpenAI SSE text is read by the
official `openai` client itself (its own HTTP stack over an in-memory transport): the request the
client sends is parsed by our openai_api.parse, the stream we write for it is what the client
iterates. Our NDJSON is read line by line as a client would."""
from __future__ import annotations

import json

import pytest

from handler.errors import AdapterLoadFailed, RequestError, error_body
from handler.openai_api import Endpoint, parse
from handler.openai_api import error_body as openai_error_body
from handler.request import parse_request
from handler.routes import JsonExchange, ModelsExchange
from handler.stream_format import DONE, NDJSON, SSE, NdjsonStream, SseStream, stream_for

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

# Our JSON API's reply body for "Hello, wörld" in three pieces, asked with logprobs: 2.
PIECES = [("Hel", ["Hel"]), ("", ["l"]), ("lo, wö", ["o", ",", " w", "ö"]), ("rld", ["rld"])]
TEXT = "".join(text for text, _ in PIECES)


def _lp(tokens):
    """Our `logprobs` shape for some tokens, each with 2 alternatives (the chosen one first)."""
    return {"tokens": list(tokens), "token_logprobs": [-0.25 * (i + 1) for i in range(len(tokens))],
            "top_logprobs": [[{"token": t, "logprob": -0.25 * (i + 1)}, {"token": "zz", "logprob": -9.0}]
                             for i, t in enumerate(tokens)]}


ALL_TOKENS = [t for _, toks in PIECES for t in toks]
OURS = {"text": TEXT, "tenant": "acme", "adapter": "acme@v2", "fallback": None, "finish_reason": "length",
        "usage": {"prompt_tokens": 5, "completion_tokens": len(ALL_TOKENS)}}
OURS_LP = {**OURS, "logprobs": _lp(ALL_TOKENS)}


def _lines(text):
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# -- our JSON API: NDJSON ---------------------------------------------------------------------------

def test_ndjson_pieces_then_the_final_chunk():
    stream = stream_for(JsonExchange(parse_request({"prompt": "x", "stream": True}, {})))
    assert isinstance(stream, NdjsonStream) and stream.content_type == NDJSON == "application/x-ndjson"
    assert not stream.started
    sent = [stream.piece(text) for text, _ in PIECES]
    assert sent[1] is None  # no new text (a held-back character): nothing to send
    assert stream.started
    chunks = _lines("".join(c for c in sent if c) + stream.finish(200, OURS))
    *texts, last = chunks
    assert texts == [{"text": "Hel"}, {"text": "lo, wö"}, {"text": "rld"}]
    assert "".join(c["text"] for c in chunks) == TEXT
    assert last == {"text": "", "finish_reason": "length", "usage": OURS["usage"], "tenant": "acme",
                    "adapter": "acme@v2", "fallback": None}


def test_ndjson_pieces_carry_their_tokens_logprobs():
    stream = NdjsonStream()
    out = "".join(c for c in (stream.piece(text, _lp(toks)) for text, toks in PIECES) if c)
    chunks = _lines(out + stream.finish(200, OURS_LP))
    assert [c["logprobs"]["tokens"] for c in chunks[:-1]] == [toks for _, toks in PIECES]
    assert chunks[1]["text"] == ""  # tokens whose text is held back still show their logprobs
    assert "logprobs" not in chunks[-1]


def test_ndjson_whole_reply_is_one_text_chunk_then_the_final_chunk():
    """The static scheduler: nothing streamed, the whole reply at once."""
    chunks = _lines(NdjsonStream().finish(200, OURS_LP))
    assert len(chunks) == 2
    assert chunks[0] == {"text": TEXT, "logprobs": OURS_LP["logprobs"]}
    assert chunks[1]["finish_reason"] == "length" and chunks[1]["text"] == ""


def test_ndjson_empty_reply_still_has_a_text_chunk():
    chunks = _lines(NdjsonStream().finish(200, {**OURS, "text": ""}))
    assert chunks == [{"text": ""}, {"text": "", **{k: OURS[k] for k in
                                                     ("finish_reason", "usage", "tenant", "adapter", "fallback")}}]


def test_ndjson_text_only_in_the_reply_is_sent_before_the_final_chunk():
    stream = NdjsonStream()
    first = stream.piece("Hel")
    chunks = _lines(first + stream.finish(200, OURS))
    assert [c["text"] for c in chunks] == ["Hel", TEXT[3:], ""]


def test_ndjson_error_after_the_first_chunk_is_the_last_chunk():
    stream = NdjsonStream()
    first = stream.piece("Hel")
    exc = AdapterLoadFailed("acme@v2", "/secret/path gone")
    chunks = _lines(first + stream.finish(503, error_body(exc)))
    assert chunks[-1] == {"error": {"message": "adapter acme@v2 cannot be served right now; try again later",
                                    "type": "AdapterLoadFailed", "status": 503}}
    assert len(chunks) == 2


def test_no_stream_asked_no_stream():
    assert stream_for(JsonExchange(parse_request({"prompt": "x"}, {}))) is None
    assert stream_for(JsonExchange(parse_request({"prompt": "x", "stream": False}, {}))) is None
    assert stream_for(parse(Endpoint.CHAT, {"model": "base", "messages": [{"role": "user", "content": "x"}]},
                            {})) is None
    from handler.openai_api import models_request
    assert stream_for(ModelsExchange(models_request(b"", {}))) is None


@pytest.mark.parametrize("value", ["yes", 1, []])
def test_stream_must_be_a_boolean(value):
    with pytest.raises(RequestError, match="'stream' must be true or false"):
        parse_request({"prompt": "x", "stream": value}, {})


# -- OpenAI: SSE read by the official client ----------------------------------------------------------

def _client(render):
    """An openai client whose HTTP requests are answered by `render(OpenAIRequest) -> SSE text`."""
    def respond(request):
        endpoint = Endpoint.CHAT if request.url.path.endswith("/chat/completions") else Endpoint.COMPLETIONS
        req = parse(endpoint, json.loads(request.content), dict(request.headers))
        assert req.request.stream
        return httpx.Response(200, headers={"content-type": SSE}, content=render(req).encode("utf-8"))

    return openai.OpenAI(base_url="http://ts.test/predictions/loraplex/1.0/v1", api_key="token", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(respond)))


def _streamed(req, *, logprobs=False, reply=None):
    """Our pieces as an SseStream writes them, then the end for `reply` (our body; default OURS)."""
    stream = stream_for(req)
    assert isinstance(stream, SseStream) and stream.content_type == SSE
    out = "".join(c for c in (stream.piece(t, _lp(toks) if logprobs else None) for t, toks in PIECES) if c)
    body = req.reply(reply or (OURS_LP if logprobs else OURS))
    return out + stream.finish(200, body)


def test_chat_stream_as_the_openai_client_reads_it():
    client = _client(_streamed)
    chunks = list(client.chat.completions.create(model="acme", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert all(type(c).__name__ == "ChatCompletionChunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1 and all(c.model == "acme" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXT
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    last = chunks[-1]
    assert last.usage.prompt_tokens == 5 and last.usage.completion_tokens == len(ALL_TOKENS)
    assert last.usage.total_tokens == 5 + len(ALL_TOKENS)
    assert last.model_extra["loraplex"] == {"tenant": "acme", "task": None, "adapter": "acme@v2", "fallback": None}
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_as_the_openai_client_reads_it():
    client = _client(_streamed)
    chunks = list(client.completions.create(model="acme", prompt="hi", max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].id.startswith("cmpl-")
    assert "".join(c.choices[0].text for c in chunks) == TEXT
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == len(ALL_TOKENS)


def test_chat_stream_logprobs_per_piece():
    client = _client(lambda req: _streamed(req, logprobs=True))
    chunks = list(client.chat.completions.create(model="acme", messages=[{"role": "user", "content": "hi"}],
                                                 temperature=0, stream=True, logprobs=True, top_logprobs=1))
    tokens = [e.token for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == ALL_TOKENS
    first = chunks[0].choices[0].logprobs.content[0]
    assert first.logprob == -0.25 and [t.token for t in first.top_logprobs] == ["Hel"]  # trimmed to top_logprobs
    assert first.bytes == list(b"Hel")


def test_completions_stream_logprobs_text_offset_runs_across_pieces():
    client = _client(lambda req: _streamed(req, logprobs=True))
    chunks = list(client.completions.create(model="acme", prompt="hi", temperature=0, stream=True, logprobs=2))
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    want, at = [], 0
    for t in ALL_TOKENS:
        want.append(at)
        at += len(t)
    assert offsets == want
    tops = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.top_logprobs]
    assert tops[0] == {"Hel": -0.25, "zz": -9.0}


def test_whole_reply_as_one_sse_chunk_then_the_final_chunk():
    """The static scheduler: the whole answer as one chunk (with its logprobs), then the final chunk."""
    def render(req):
        return stream_for(req).finish(200, req.reply(OURS_LP))

    client = _client(render)
    chunks = list(client.chat.completions.create(model="acme", messages=[{"role": "user", "content": "hi"}],
                                                 temperature=0, stream=True, logprobs=True))
    assert len(chunks) == 2
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == TEXT
    assert [e.token for e in chunks[0].choices[0].logprobs.content] == ALL_TOKENS
    assert chunks[1].choices[0].finish_reason == "length" and chunks[1].usage.prompt_tokens == 5


def test_sse_ends_with_done_and_every_event_is_data():
    req = parse(Endpoint.COMPLETIONS, {"model": "base", "prompt": "hi", "stream": True}, {})
    text = _streamed(req)
    assert text.endswith(DONE) and text.count(DONE) == 1
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)


def test_error_after_the_first_chunk_raises_in_the_openai_client():
    def render(req):
        stream = stream_for(req)
        return stream.piece("Hel") + stream.finish(503, openai_error_body(AdapterLoadFailed("acme@v2", "gone")))

    client = _client(render)
    got = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="acme", messages=[{"role": "user", "content": "hi"}],
                                                    stream=True):
            got.append(chunk.choices[0].delta.content)
    assert got == ["Hel"]
    assert "cannot be served right now" in caught.value.message
    assert caught.value.body["type"] == "server_error"
