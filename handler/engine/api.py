"""The one small interface between the request path and an inference engine.

Why: the handler must not care whether a batch is served by grouping rows per
adapter (plain PEFT, `engine: peft`) or by the slot-pool engine that runs a
mixed-tenant batch in one forward pass (`engine: multilora`). Both implement
`Engine`. Nothing here knows about tenants, Redis or TorchServe; adapters are
plain names chosen by the caller.

Concurrency: an engine is owned by one thread (the TorchServe worker's request
loop). No method is thread-safe; callers serialise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from loraplex_common.adapter_format import AdapterBytes


MAX_LOGPROBS = 20  # the most alternatives a row may ask for per token (OpenAI's `top_logprobs` cap)


@dataclass(frozen=True)
class SamplingParams:
    """Per-row decoding settings. Rows with equal params may share a `generate` call.

    ``logprobs``: 0 (default) = none, no extra work anywhere; k in 1..`MAX_LOGPROBS` = each
    returned token's log-probability and the top-k alternatives (`GenerationOutput`). They are
    taken from the model's own next-token distribution, log_softmax of the raw logits in fp32,
    before temperature and top-p (what OpenAI and vLLM report by default): a confidence
    threshold on an answer's mean token log-probability must not move with the temperature the
    request sampled at, and a top-p cut would turn every excluded alternative into -inf. The
    engine refuses other values (`EngineError`, per row).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int = 0


@dataclass(frozen=True)
class GenerationRow:
    """One request's work: prompt token ids, the adapter to run it with (None = base model)."""

    input_ids: Sequence[int]
    adapter: str | None
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class GenerationOutput:
    """New tokens only (prompt and padding stripped, generation stops at the first EOS).

    With ``SamplingParams.logprobs = k >= 1``: ``token_logprobs[t]`` is the log-probability of
    ``token_ids[t]`` and ``top_logprobs[t]`` the k most likely (token id, log-probability) pairs
    at that step, most likely first (the distribution `SamplingParams` names); the EOS that
    stopped the row is not a returned token and has neither. Both are None when not asked.
    """

    token_ids: list[int]
    finish_reason: str  # "stop" (EOS reached) or "length" (max_new_tokens reached)
    token_logprobs: list[float] | None = None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None


@dataclass(frozen=True)
class LoadedAdapter:
    """What the engine reports after a load; `nbytes` is what the adapter now occupies."""

    name: str
    nbytes: int
    load_ms: float


class Engine(Protocol):
    """What serving needs of an engine (handler/service.py, handler/residency.py), in PEFT's names
    and meanings, plus one batched `generate`. Nothing else: switching a default adapter or
    disabling adapters is the PEFT-named facade's business (`multilora.MultiLoraModel`), since
    every `GenerationRow` names its own adapter."""

    kind: str  # "peft" or "multilora"

    def load_adapter(self, source: "str | os.PathLike | AdapterBytes", adapter_name: str) -> LoadedAdapter:
        """Load a PEFT adapter from a directory or from the verified bytes of one (`AdapterBytes`)."""
        ...

    def delete_adapter(self, adapter_name: str) -> None: ...

    @property
    def active_adapter(self) -> str | None: ...

    @property
    def peft_config(self) -> Mapping[str, Any]: ...

    def get_model_status(self) -> Mapping[str, Any]: ...

    def generate(self, rows: Sequence[GenerationRow]) -> list[GenerationOutput]:
        """Serve every row; a row's output depends only on its own prompt, adapter and params."""
        ...
