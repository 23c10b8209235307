"""Token ids → text, one token at a time, for a streamed reply: the one home of the stop-string
cut and of the reply's `logprobs` shape, shared by the whole-reply path (service `_reply`).

A streamed reply must concatenate to exactly the text the same request gets without streaming:
`decode(all tokens)` cut at the earliest stop string. So a `TextStream` decodes the row's whole
token list after each token (prefix stable for the byte-level BPE and SentencePiece tokenizers
we serve) and hands out only text that can no longer change:
- a trailing U+FFFD (an incomplete UTF-8 character whose next bytes are still to come);
- any suffix that is the start of a stop string (it may still become one);
- trailing whitespace when the tokenizer cleans up spaces (`" ."` → `"."` would rewrite it).
A stop string ends the row (`stopped`) once no other stop string could still complete at an
earlier position (stops "abcd" and "c" on "abc": "c" is found at 2, but "abcd" could start at 0,
and the whole-reply rule cuts at the earliest occurrence in the final text).

Cost: each token decodes a window of at most 2 * WINDOW tokens, not the whole row (the new text
is the window's growth), falling back to the whole row where the window's text is not a suffix
of the row's (a window starting inside a character).

Each piece covers the tokens that reach its end (`covering`: the fewest leading tokens whose
text reaches a length; the same rule the reply uses for `usage.completion_tokens` after a cut),
so the pieces' tokens and log-probabilities concatenate to the reply's.

Pure, no threads: a `TextStream` belongs to the one row it decodes (the scheduler thread).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

Decode = Callable[[Sequence[int]], str]  # token ids -> text, special tokens skipped (the reply's decode)
WINDOW = 8  # tokens decoded per step to find the new text


def stop_cut(text: str, stops: Sequence[str]) -> int:
    """Where a reply is cut: the earliest position at which any stop string occurs, -1 if none."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def covering(length: Callable[[int], int], tokens: int, chars: int, start: int = 0) -> int:
    """The fewest leading tokens (of `tokens`) whose text reaches `chars` characters, where
    `length(n)` is the length of the first n tokens' text; all of them if none does. What a reply
    cut at a stop string really used: the token holding the cut counts, tokens past it do not.
    `start`: a count known to fall short of `chars` or to be the answer (scanning starts there)."""
    for n in range(start, tokens + 1):
        if length(n) >= chars:
            return n
    return tokens


def logprobs_body(token_text: Callable[[int], str], token_ids: Sequence[int], token_logprobs: Sequence[float],
                  top_logprobs: Sequence[Sequence[tuple[int, float]]]) -> dict:
    """Our JSON API's `logprobs` for these tokens: each token decoded on its own with special tokens
    shown (`token_text`), so an alternative such as EOS is named."""
    return {
        "tokens": [token_text(i) for i in token_ids],
        "token_logprobs": [float(lp) for lp in token_logprobs],
        "top_logprobs": [[{"token": token_text(i), "logprob": float(lp)} for i, lp in step] for step in top_logprobs],
    }


@dataclass(frozen=True)
class Piece:
    """New visible text and the tokens it covers, `token_ids[start:end]` of the row."""

    text: str
    start: int
    end: int


@dataclass
class TextStream:
    decode: Decode
    stops: tuple[str, ...] = ()
    hold_spaces: bool = False  # the tokenizer's clean_up_tokenization_spaces
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""  # the text handed out so far
    emitted_tokens: int = 0  # the tokens those pieces covered
    stopped: bool = False  # a stop string ended the row (the reply cuts there)
    text: str = ""  # decode(token_ids)
    _lengths: list[int] = field(default_factory=lambda: [0])
    _window_start: int = 0  # the window: token_ids[_window_start:], its text before the last token
    _window_text: str = ""

    def push(self, token_id: int) -> Piece | None:
        """Take the row's next token; the text that became final with it, if any."""
        self.token_ids.append(int(token_id))
        self.text = text = self._grown(self.text)
        self._lengths.append(len(text))
        settled = text.rstrip("\ufffd")  # an incomplete character at the end may still become anything
        cut = stop_cut(settled, self.stops)  # (a stop over such a character is no stop yet)
        shown = settled.rstrip() if self.hold_spaces else settled
        end = min(cut, len(shown)) if cut >= 0 else len(shown)
        pending = self._stop_may_start(settled, cut if cut >= 0 else len(settled))
        if cut >= 0 and pending is None:
            self.stopped = True
        safe = cut if self.stopped else min(end, pending if pending is not None else end)
        if safe <= len(self.emitted) or not text.startswith(self.emitted):
            return None  # nothing new is final (or the decode rewrote earlier text: the reply settles it)
        new = text[len(self.emitted):safe]
        self.emitted += new
        start = self.emitted_tokens
        self.emitted_tokens = covering(self._lengths.__getitem__, len(self.token_ids), len(self.emitted), start)
        return Piece(new, start, self.emitted_tokens)

    def _grown(self, before: str) -> str:
        """decode(token_ids) from the text of all but the last token: the growth of a window that
        starts at a fixed token (moved forward every WINDOW tokens), so a token costs one decode of
        at most 2 * WINDOW tokens."""
        ids, n = self.token_ids, len(self.token_ids)
        if n - self._window_start > 2 * WINDOW:  # move it: to a start whose text is the row's tail
            for start in range(n - WINDOW, n - WINDOW - 4, -1):  # (not inside a character)
                self._window_start, self._window_text = start, self.decode(ids[start:n - 1])
                if before.endswith(self._window_text):
                    break
        old, new = self._window_text, self.decode(ids[self._window_start:])
        self._window_text = new
        kept = old.rstrip("\ufffd")  # an incomplete character may have been completed by the new token
        if before.endswith(old) and new.startswith(kept):
            return before[:len(before) - len(old) + len(kept)] + new[len(kept):]
        return self.decode(ids)
    def rest(self, text: str, kept_tokens: int) -> Piece | None:
        """The last piece, from the reply's own `text` and completion tokens: what the pieces so far
        did not cover (None when nothing is left)."""
        if not text.startswith(self.emitted):  # unreachable for a prefix-stable decode
            return None
        new, start = text[len(self.emitted):], self.emitted_tokens
        end = max(start, kept_tokens)
        self.emitted, self.emitted_tokens = text, end
        return Piece(new, start, end) if new or end > start else None

    def _stop_may_start(self, text: str, before: int) -> int | None:
        """The earliest position < `before` from which `text` (what is final of it) is the start of
        a stop string that has not occurred there."""
        if not self.stops:
            return None
        longest = max(len(s) for s in self.stops)
        for q in range(max(0, len(text) - longest + 1), before):
            tail = text[q:]
            if any(len(tail) < len(s) and s.startswith(tail) for s in self.stops):
                return q
        return None
