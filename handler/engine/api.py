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

from .errors import CacheFull, EngineError, RowTooLong  # noqa: F401  (the stepper's errors, re-exported)


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


@dataclass(frozen=True)
class StepLimits:
    """What a `RowStepper` is sized with (its KV cache is ``max_rows x max_len`` tokens per layer)."""

    max_rows: int = 16          # KV rows = rows that can run at once
    max_len: int = 2304         # tokens one row may hold: prompt + new tokens
    prefill_chunk: int = 512    # most prompt tokens prefilled in one step, all joining rows together (>= 1 chunk of one row per step)
    graph_batch_sizes: tuple[int, ...] = ()   # GPU graphs: decode batch buckets captured at warmup; () = 1,2,4,... up to max_rows
    prefill_wait_steps: int = 8  # GPU graphs: joining rows may wait up to this many decode steps to be prefilled together (0 = at once)
    prefill_graphs: bool = True  # GPU graphs: prefill chunks of up to 8 rows replay captured graphs too (False: eager)
    overlap: bool | None = None  # a step's tokens reach the host while the next step runs (events one step late); None = with GPU graphs
    mixed: bool | None = False  # joining prompts of at most mixed_tokens ride in the decode step's forward; None = with GPU graphs
    mixed_tokens: int = 64  # mixed: prompt tokens one decode step carries at most (GPU graphs: chunks of 16, 32, ... tokens, 1, 2 or 4 rows)

    def __post_init__(self) -> None:
        if (self.max_rows < 1 or self.max_len < 2 or self.prefill_chunk < 1 or self.prefill_wait_steps < 0
                or self.mixed_tokens < 1):
            raise EngineError(f"bad step limits: max_rows {self.max_rows} (>= 1), max_len {self.max_len} (>= 2), "
                              f"prefill_chunk {self.prefill_chunk} (>= 1), prefill_wait_steps "
                              f"{self.prefill_wait_steps} (>= 0), mixed_tokens {self.mixed_tokens} (>= 1)")
        sizes = tuple(int(b) for b in self.graph_batch_sizes)
        if any(not 1 <= b <= self.max_rows for b in sizes):
            raise EngineError(f"graph_batch_sizes {list(sizes)} must lie in 1..max_rows ({self.max_rows})")
        object.__setattr__(self, "graph_batch_sizes", sizes)


@dataclass(frozen=True)
class RowEvent:
    """What one `RowStepper.step` produced for one row."""

    row_id: int
    token_id: int | None        # the new token; None only with finished="stop" (EOS is not a returned token, as in GenerationOutput)
    finished: str | None        # None = row continues; "stop" = EOS; "length" = max_new_tokens reached (event carries that last token)
    logprob: float | None = None                                  # with params.logprobs >= 1 (same definition as SamplingParams says)
    top_logprobs: tuple[tuple[int, float], ...] | None = None


class RowStepper(Protocol):
    """Rows that join and leave between any two steps (continuous batching), each with its own
    adapter, sampling params and stop condition; `handler.engine.stepping.Stepper` implements it.

    A row's tokens and log-probabilities are what `Engine.generate([row])` gives it alone.
    Concurrency: owned by ONE thread (the scheduler's); nothing is thread-safe.
    """

    limits: StepLimits

    def add(self, row_id: int, row: GenerationRow) -> None:
        """Admit a row: `CacheFull` (no KV row free now), `RowTooLong` (can never fit), `EngineError`
        (bad params, unknown adapter, row id in use). The slot of ``row.adapter`` is resolved NOW and
        kept for the row's life."""
        ...

    def cancel(self, row_id: int) -> None:
        """Free the row's KV row at once; an unknown id is a no-op."""
        ...

    def step(self) -> list[RowEvent]:
        """Prefill at most ``prefill_chunk`` prompt tokens of joining rows (a row whose prompt completes
        gets its first token in this step's events), then ONE decode forward for every row that was
        decoding when the step began. [] when idle. A finished row's KV row is free when step returns.
        The same as `prefill_phase()` then `decode_phase()`, their events concatenated.

        With ``limits.overlap`` the events a step returns are those of the step BEFORE it (its tokens
        reach the host while this one runs), so a row's last event, and the freeing of its KV row,
        come one step later; rows never see another order of tokens."""
        ...

    def prefill_phase(self) -> list[RowEvent]:
        """A step's first half: its prefill, and the first-token events of rows whose prompt completed
        ([] with overlap: they come with the next step's events). Between the two halves the caller
        may hand those out and `cancel` rows, but not `add` any."""
        ...

    def decode_phase(self) -> list[RowEvent]:
        """A step's second half: the decode forward of the rows that were decoding when
        `prefill_phase` began and are not cancelled since; [] without a `prefill_phase` before it
        (with overlap: the previous step's events, whatever this one runs)."""
        ...

    def rows(self) -> int:
        """Rows added and not finished or cancelled."""
        ...

    def free_rows(self) -> int: ...

    def uses(self, adapter_name: str) -> int:
        """Rows (prefilling or decoding) on this adapter."""
        ...

    def kv_utilisation(self) -> float:
        """Tokens held / (max_rows * max_len)."""
        ...

    def warmup(self) -> None:
        """GPU graphs: capture every decode bucket now (while no row runs); otherwise a no-op."""
        ...

    def describe(self) -> dict:
        """{"captures", "captures_after_warmup", "buckets", "rows", "max_rows", "max_len", "kv_utilisation", "steps", ...}"""
        ...


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

    def stepper(self, limits: StepLimits) -> RowStepper:
        """The engine's row stepper for continuous scheduling (`EngineError` where the engine has none)."""
        ...

    def embed(self, batch: Sequence[Sequence[int]]) -> Any:
        """torch.Tensor [len(batch), hidden] float32 (CPU): each prompt's mean-pooled last hidden state of
        the base model, no adapter (`embedding.mean_pooled`; the task router's embedding)."""
        ...
