"""The worker's one tokenizer, shared by every thread that parses a request.

Why a lock: a transformers fast tokenizer is not safe to encode with from two threads at once.
Each call sets its options on the one Rust tokenizer it wraps (`encode_special_tokens` from
`split_special_tokens`, truncation and padding) and then encodes with the GIL released, so a
concurrent call can run with the other's options. `prompts.encode_messages` encodes the chat
template's text with special tokens recognised and each message's content with
`split_special_tokens=True`; interleaved with another request's, the template's `<|im_end|>`
came out as seven plain-text tokens: a different prompt, a visibly different answer (cold demo
waves, 2026-12; `tests/handler/test_tokenizing.py` shows it on SmolLM2's tokenizer). Every
encode therefore runs under one lock. It is held for one encode (microseconds to a millisecond
for the longest prompts); with continuous batching the request threads encode, and the scheduler
thread only decodes.

Decoding and attribute reads go to the tokenizer directly: `decode` sets no option (it reads the
tokenizer's state only), so the scheduler thread's per-token decodes never wait for a request's
encode.

Concurrency: any thread may call anything here.
"""
from __future__ import annotations

import threading
from typing import Any


class SerialTokenizer:
    """A tokenizer whose encoding calls (`__call__`, `encode`, `apply_chat_template`) run one at a
    time; everything else (`decode`, `eos_token_id`, ...) is the wrapped tokenizer's own."""

    def __init__(self, tokenizer: Any) -> None:
        self.wrapped = tokenizer
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self.wrapped(*args, **kwargs)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self.wrapped.encode(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:  # it may tokenize (tokenize=True), with the same per-call options
            return self.wrapped.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def serial(tokenizer: Any) -> SerialTokenizer:
    """`tokenizer` shareable between threads (itself when it already is)."""
    return tokenizer if isinstance(tokenizer, SerialTokenizer) else SerialTokenizer(tokenizer)
