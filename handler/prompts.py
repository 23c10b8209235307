"""Chat messages -> prompt token ids, with the content of every message kept as text.

Why not `apply_chat_template(tokenize=True)`: that renders the template to one
string and tokenizes it whole, so `<|im_start|>system` written *inside* a
message's content becomes the real special token and a user can forge turns
(e.g. a system turn the application never sent). Here the template is rendered
with a random marker in place of each content; the template's own text is
tokenized with special tokens recognised, each content with
`split_special_tokens=True` (special-token strings become ordinary text tokens).
For content without special-token strings the ids equal the template's own
tokenization (tests hold that on the test tokenizer and on SmolLM2's).

A template that changes content (trims or reformats it) breaks the marker
round trip; then content holding a special-token string is refused (400) and
other content goes through the template as usual.

Any thread, with the service's `tokenizing.SerialTokenizer` (a bare transformers tokenizer is not
safe to encode with from two threads: `handler/tokenizing.py`).
"""
from __future__ import annotations

import secrets
from typing import Any, Mapping, Sequence

from .errors import InvalidRequest


def encode_messages(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    contents = [m["content"] for m in messages]
    marks = [f"\ue000{secrets.token_hex(8)}\ue001" for _ in messages]
    real = _render(tokenizer, messages, contents)
    pieces = _split(_render(tokenizer, messages, marks), marks)
    if pieces is None or _join(pieces, contents) != real:
        return _encode_whole(tokenizer, real, contents)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if i < len(contents) and contents[i]:
            ids += tokenizer(contents[i], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [int(t) for t in ids]


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], contents: Sequence[str]) -> str:
    chat = [{"role": m["role"], "content": c} for m, c in zip(messages, contents)]
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def _split(text: str, marks: Sequence[str]) -> list[str] | None:
    """The template text around each marker, in order; None unless each appears once, in order."""
    pieces = []
    rest = text
    for mark in marks:
        if text.count(mark) != 1 or mark not in rest:
            return None
        before, rest = rest.split(mark, 1)
        pieces.append(before)
    pieces.append(rest)
    return pieces


def _join(pieces: Sequence[str], contents: Sequence[str]) -> str:
    out = pieces[0]
    for content, piece in zip(contents, pieces[1:]):
        out += content + piece
    return out


def _encode_whole(tokenizer: Any, rendered: str, contents: Sequence[str]) -> list[int]:
    special = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    special += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                if getattr(t, "special", False) and t.content]
    for i, content in enumerate(contents):
        for token in special:
            if token in content:
                raise InvalidRequest(f"messages[{i}].content contains the special token {token!r}, which this "
                                     f"model's chat template cannot keep as text")
    return [int(t) for t in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
