"""`Stepper`: continuous batching over a per-row KV cache (`api.RowStepper`).

Rows join and leave between any two steps. Each step (`Stepper.step`):

1. prefill: at most ``prefill_chunk`` prompt tokens of joining rows, in the order they were
   added (a long prompt takes several steps, so it never stalls the running rows for more
   than one chunk); the chunks run eagerly, several rows per forward (left-padded, grouped by
   `_pack`: on a CPU only while the padding costs less than the forward it saves); the chunk
   that completes a prompt gives
   that row its first token in this step's events;
2. decode: ONE forward ``[B, 1]`` for every row that was decoding when the step began, each
   row at its own position, with its own LoRA slot, sampling rule and stop condition.

`prefill_phase` and `decode_phase` are those two halves (`step` runs both), so a caller can hand
out the first tokens of rows that completed their prompt before the decode forward runs.

Mixed steps (``limits.mixed``, off by default): while rows decode, a step whose joining rows need
at most ``mixed_tokens`` more prompt tokens skips 1. and runs their chunks inside 2.'s forward
(`_decode_mixed`): ``[B + n*S, 1]`` tokens, every token its own batch row with its own position and
LoRA slot, attention split by `mixed_attention` (decode rows over KV rows ``[0, B)``, the n chunks
of S tokens over their rows); completed prompts' first tokens come with that step's events.

Tokens are picked on the device (`_pick`: argmax or the row's sampler, log-probabilities) and kept
there as each KV row's last token (`_last`), which is the next decode step's input: a step's
inputs need nothing back from the host but positions and slots, which the host knows. Overlap
(``limits.overlap``, default on with graphs): the picks are copied back without waiting
(page-locked memory, a CUDA event), the step is queued, and only then are the PREVIOUS step's
tokens read (`_deliver`), so the device runs step N+1 while the host hands out step N's tokens,
admits rows and builds step N+2. The price: events come one step late, so a row that hit EOS
(or a stop string the caller matches) has one more step queued, computed and dropped
(``past_end``), and an ended row's KV row frees one step later. Rows never see a different token:
a row's positions count the tokens it has picked, whether or not the host has read them. Without
overlap (a CPU, where forwards run on the calling thread) each forward's tokens are read at once.
Every host-to-device copy on a step's path is page-locked and non-blocking (`_index`), since a
pageable copy waits for everything queued before it.

KV rows (`row_cache.RowCache`): a row takes the LOWEST free KV row, and before each step a row
above a free KV row moves down into it (`_compact`: its keys/values copied once), so the rows
fill ``[0, rows)`` and the decode batch is the contiguous slice ``[0, B)`` of the cache
(B = highest decoding row + 1): nothing is gathered or copied per step. A hole in that slice (a free row, or one still prefilling)
runs as a dummy base-model row fed the pad token, writing only where its own row is free
or will be overwritten (its next write position), output dropped.

Masks and positions: a row's token at position p lives at index p of its KV row (no padding),
position ids are the row's positions, and a query at position p sees keys ``0..p``. Eagerly
the key length is the longest row in the batch rounded up to 64 (less attention work);
with graphs it is one of a few length buckets.

GPU (``graph_ranks`` given): the decode step of each (batch bucket, key-length bucket, LoRA
rank bucket) is captured once as a CUDA graph that reads the rows' LoRA slots, token ids and
positions from one fixed device tensor (one host-to-device copy per step) and builds its own
mask. A graph's LoRA kernels run at its rank bucket, which serves every smaller rank
(zero-padded slots), so a graph serves any mix of adapters up to that rank; a step takes the
smallest bucket covering its rows' ranks (the rank buckets `MultiLoraModel.decode_rank` uses),
since the kernels' cost grows with the rank they run at. The key length is bucketed for the
same reason: attention reads every key up to it. `warmup` captures every bucket before
serving, so a serving run makes no capture (`describe`: ``captures_after_warmup``).
Prefill on a GPU replays captured graphs too (`prefill_graphs`): an eager prefill forward costs
mostly fixed host time (launching every layer's kernels), many decode steps' worth whatever its
length. Chunks are packed into forwards of (rows, tokens per row) shapes `prefill_shapes` (rows
1, 2, 4, 8 x tokens 16, 32, ... up to the chunk, at most `PREFILL_GRAPH_TOKENS` in all), each
row left-padded to the shape's tokens and the shape's spare rows fed pad tokens that write into
the cache's scratch row; key lengths are the decode buckets up to `PREFILL_GRAPH_MAX_LEN`, and
the LoRA kernels run at the top rank bucket (serving every rank; prefill is compute-bound, so a
smaller bucket would save little). One graph reads the chunk's ids, positions, KV rows and LoRA
slots from one device tensor (one host-to-device copy). What no shape holds (a longer key
length, a longer chunk) runs eagerly. Rows that join while others decode still wait up to
``prefill_wait_steps`` steps to be prefilled in one forward (`_defer_prefill`), and an eager
forward takes chunks whose padding stays within `PACK_FLOOR` tokens. `warmup` captures every
prefill shape and compiles every variant of the eager path's Triton LoRA kernels
(`LoraRows.warm_prefill_kernels`), which Triton would otherwise JIT-compile on a request's
path. Without CUDA the same loop runs eagerly: that is how CPU tests check it.

Sampling per row: greedy = argmax; sampled rows go through `static_decode.picker` (the
warpers ``generate`` uses) with their own ``torch.Generator`` seeded by ``params.seed``
(a random seed when None), so a seeded row's tokens do not depend on its batch mates.
Log-probabilities per row as `api.SamplingParams` defines them (`logprobs.step` on the
raw logits), only for rows that ask.

Why not transformers' own continuous batching (`transformers.generation.continuous_batching`,
5.23, looked at for issue 13):

- It flattens every request's tokens into one ``[1, total_tokens]`` sequence (varlen /
  paged attention). Our LoRA layers (`multilora.layer`) take one slot per *batch row* from
  `multilora.context.BatchContext`; on a flattened batch every token would get row 0's slot.
  Serving them would need a per-token slot tensor built from the request->token layout,
  which only `ContinuousBatchingIOs.prepare_batch_tensors` knows: there is no hook there to
  attach per-request data to the forward (``add_request`` takes only logits-processor kwargs)
  and nothing in ``batch_data`` we could derive slots from without subclassing private classes.
- Its CUDA graphs are captured inside `ModelRunner.compute_batch` around ``model(**batch_data)``
  *plus* its sampler, with no way to run the capture inside our ``static_batch`` context
  (the slot tensor the LoRA kernels read at replay), and its padding intervals decide the
  shapes, not our batch buckets.
- Sampling is per manager, not per request: ``do_sample`` and the seed are global
  (`ModelRunner.do_sample`, one TP seed, ``torch.multinomial`` on the default generator), so
  a seeded row's tokens would depend on its batch mates; temperature/top-p per request only
  through ``per_request_processors``.
- Log-probs: only the chosen token's, taken *after* the logits processors (temperature,
  top-p), and no top-k alternatives; our API defines them on the raw logits with top-k.
- It runs its own background thread with queues (``ContinuousBatchingManager``); our
  scheduler thread owns the engine and wants one synchronous step at a time.

Concurrency: owned by one thread (the scheduler's), like the engine; nothing is thread-safe.
`describe`, `rows`, `free_rows` and `kv_utilisation` only read counters and snapshots, so a
status call from another thread gets a slightly stale answer rather than an error.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from . import logprobs as lp
from .api import GenerationRow, RowEvent, SamplingParams, StepLimits
from .errors import CacheFull, EngineError, RowTooLong
from .generation import generation_kwargs, validate_rows
from .mixed_attention import MixedLayout, inner_attention, mixed_forward
from .row_cache import RowCache
from .static_decode import SUPPORTED_ATTENTION, LoraRows, picker, round_up

EAGER_LEN = 64  # eager decode/prefill: key length rounded up to a multiple of this
GRAPH_MIN_LEN = 256  # graphs: key-length buckets 256, 512, 1024, ... and max_len


def batch_buckets(limits: StepLimits) -> list[int]:
    """Decode batch sizes captured as graphs: `graph_batch_sizes` (or 1, 2, 4, ...), always with
    ``max_rows``, so every batch has a bucket."""
    sizes = set(limits.graph_batch_sizes)
    if not sizes:
        b = 1
        while b < limits.max_rows:
            sizes.add(b)
            b *= 2
    sizes.add(limits.max_rows)
    return sorted(sizes)


def length_buckets(max_len: int) -> list[int]:
    """Key lengths captured as graphs: 256, 512, 1024, ... below `max_len`, then `max_len`."""
    out, t = [], GRAPH_MIN_LEN
    while t < max_len:
        out.append(t)
        t *= 2
    return out + [max_len]


PACK_FLOOR = 1024  # GPU: a prefill forward of up to this many tokens, padding included, never splits
CPU_FORWARD_TOKENS = 16  # CPU: a prefill forward's fixed cost in prompt tokens' worth (`_pack`'s `spare`; bench/RESULTS.md)

# GPU prefill graphs: chunks of up to 8 rows, padded to (rows, tokens) buckets of at most this many tokens
PREFILL_GRAPH_ROWS = (1, 2, 4, 8)
PREFILL_GRAPH_MIN_TOKENS = 16  # token buckets 16, 32, 64, ... (per row) up to the chunk
PREFILL_GRAPH_TOKENS = 512  # a captured prefill computes at most rows x tokens = this many
PREFILL_GRAPH_MAX_LEN = 1024  # key lengths above this prefill eagerly (long prompts' later chunks)


def prefill_shapes(limits: StepLimits) -> list[tuple[int, int]]:
    """(rows, tokens per row) of the prefill forwards captured as graphs: rows 1, 2, 4, 8 (up to
    `max_rows`) x tokens 16, 32, ... (up to `prefill_chunk` rounded up to a power of two), at most
    `PREFILL_GRAPH_TOKENS` in all; [] when `prefill_graphs` is off."""
    if not limits.prefill_graphs:
        return []
    tokens, t = [], PREFILL_GRAPH_MIN_TOKENS
    while True:
        tokens.append(t)
        if t >= limits.prefill_chunk or t >= PREFILL_GRAPH_TOKENS:
            break
        t *= 2
    return [(n, s) for n in PREFILL_GRAPH_ROWS if n <= limits.max_rows for s in tokens if n * s <= PREFILL_GRAPH_TOKENS]


MIXED_ROWS = (1, 2, 4)  # mixed steps: prompt chunks of up to this many rows ride in one decode step


def mixed_shapes(limits: StepLimits) -> list[tuple[int, int]]:
    """(rows, tokens per row) of the prompt chunks a captured mixed step carries: rows 1, 2, 4 (up
    to `max_rows`) x tokens 16, 32, ... with rows x tokens at most `mixed_tokens`."""
    out = []
    for n in MIXED_ROWS:
        S = PREFILL_GRAPH_MIN_TOKENS
        while n <= limits.max_rows and n * S <= limits.mixed_tokens:
            out.append((n, S))
            S *= 2
    return out


def prefill_length_buckets(max_len: int) -> list[int]:
    """Key lengths of the captured prefill forwards: the decode buckets up to `PREFILL_GRAPH_MAX_LEN`."""
    return [t for t in length_buckets(max_len) if t <= PREFILL_GRAPH_MAX_LEN]  # never empty: the first is 256 or less


def _pack(chunks: list[tuple[Any, int]], floor: int = 0, spare: int | None = None) -> list[list[tuple[Any, int]]]:
    """Group prefill chunks (item, tokens) into forwards, longest first, each left-padded to its
    longest chunk.

    - `spare` given (eager on a CPU, where a forward costs a fixed part plus about its tokens,
      padding included): a chunk joins the group while the group's padding stays within `spare`
      tokens per chunk beyond the first, `spare` being a forward's fixed part counted in tokens
      (what one forward fewer saves);
    - else (eager on a GPU): while the padded forward has at most twice the group's real tokens
      or stays within `floor` tokens, padding included (a forward's cost is mostly its fixed host
      time, so one padded forward beats two)."""
    groups: list[list[tuple[Any, int]]] = []
    for item in sorted(chunks, key=lambda c: -c[1]):
        g = groups[-1] if groups else None
        if g is not None:
            padded, real = (len(g) + 1) * g[0][1], sum(n for _, n in g) + item[1]
            joins = (padded - real <= spare * len(g)) if spare is not None else (padded <= 2 * real or padded <= floor)
            if joins:
                g.append(item)
                continue
        groups.append([item])
    return groups


def _first_at_least(buckets: Sequence[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


class DeviceTime:
    """Milliseconds the device spent on the stepper's forwards, per phase (CUDA events around each
    forward; None on a CPU, where the forwards run on the calling thread and its wall time says it).
    Read back at the next sync the step makes anyway (`collect`, after the tokens' `tolist`), so it
    adds no wait. Owned by the stepper's thread."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.ms = {"prefill": 0.0, "decode": 0.0, "mixed": 0.0}
        self._open: list[tuple[str, Any, Any]] = []

    def start(self) -> Any:
        if not self.enabled:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, phase: str, started: Any) -> None:
        if started is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open.append((phase, started, event))

    def collect(self) -> None:
        """Add the finished forwards' times (those not finished yet wait for the next collect)."""
        pending = []
        for phase, a, b in self._open:
            if b.query():
                self.ms[phase] += a.elapsed_time(b)
            else:
                pending.append((phase, a, b))
        self._open = pending

    def describe(self) -> dict[str, float] | None:
        return {k: round(v, 3) for k, v in self.ms.items()} if self.enabled else None


@dataclass(eq=False)
class _Row:
    row_id: int
    kv: int  # KV row index
    prompt: list[int]
    adapter: str | None
    slot: int  # LoRA slot resolved at `add`, kept for the row's life
    rank: int  # its rank bucket for captured steps (0: base, or no graphs)
    params: SamplingParams
    pick: Callable[[torch.Tensor], torch.Tensor] | None  # None = greedy (batched argmax)
    added: int = 0  # the stepper's step count when the row was added
    filled: int = 0  # prompt tokens in the cache
    generated: int = 0  # new tokens picked (counted when picked on the device; an EOS among them ends the row)

    @property
    def decoding(self) -> bool:
        """It has its first token and may need another (its next token's input: `Stepper._last`)."""
        return 0 < self.generated < self.params.max_new_tokens

    @property
    def held(self) -> int:
        """Tokens in the cache = the position the row writes next."""
        return self.filled + max(self.generated - 1, 0)


@dataclass(eq=False)
class _Pending:
    """One forward's picked tokens on their way to the host (`Stepper._deliver` turns them into events)."""

    rows: list[_Row]
    counts: list[int]  # each row's `generated` with this token
    tokens: torch.Tensor  # [N] picked ids (host, page-locked, once `ready` has passed; else on the device)
    ask: list[int]  # the rows (indices into `rows`) that want log-probabilities
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # chosen [A], top ids [A, k], top values [A, k]
    ready: Any = None  # CUDA event recorded after the device-to-host copies (overlap), else None


@dataclass(eq=False)
class _Graph:
    """One captured decode step: everything it reads or writes, at fixed addresses."""

    batch: int
    length: int
    rank: int  # LoRA kernel rank (0: the plain model, no LoRA layers)
    inputs: torch.Tensor  # [3, B] long per row: token id (a device copy of `Stepper._last`), position, LoRA slot
    graph: Any = None
    logits: torch.Tensor | None = None
    replays: int = 0
    failed: bool = False  # the capture raised: this bucket's steps run eagerly

    @property
    def ids(self) -> torch.Tensor:
        return self.inputs[0].view(self.batch, 1)

    @property
    def pos(self) -> torch.Tensor:
        return self.inputs[1].view(self.batch, 1)

    @property
    def slots(self) -> torch.Tensor:
        return self.inputs[2]

    def forward(self, st: "Stepper") -> torch.Tensor:
        """The step the graph captures (and an emulated replay reruns)."""
        return st._decode_forward(self.ids, self.pos, self.length)


@dataclass(eq=False)
class _PrefillGraph:
    """One captured prefill forward of `rows` x `tokens` (left-padded chunks; rows beyond the real
    ones write into the cache's scratch row), attending over `length` keys, LoRA kernels at `rank`."""

    rows: int
    tokens: int
    length: int
    rank: int
    inputs: torch.Tensor  # [2 n S + 2 n] long: ids [n, S], positions [n, S], KV row [n], LoRA slot [n]
    graph: Any = None
    logits: torch.Tensor | None = None
    replays: int = 0
    failed: bool = False

    @property
    def ids(self) -> torch.Tensor:
        return self.inputs[: self.rows * self.tokens].view(self.rows, self.tokens)

    @property
    def pos(self) -> torch.Tensor:
        n = self.rows * self.tokens
        return self.inputs[n: 2 * n].view(self.rows, self.tokens)

    @property
    def kv(self) -> torch.Tensor:
        n = 2 * self.rows * self.tokens
        return self.inputs[n: n + self.rows]

    @property
    def slots(self) -> torch.Tensor:
        return self.inputs[2 * self.rows * self.tokens + self.rows:]

    def forward(self, st: "Stepper") -> torch.Tensor:
        return st._chunk_forward(self.ids, self.pos, self.kv, self.length)


@dataclass(eq=False)
class _MixedGraph:
    """One captured mixed step: a decode step over KV rows [0, `batch`) plus `rows` prompt chunks of
    `tokens` each (left-padded; rows beyond the real ones write into the scratch row), all attending
    over `length` keys, LoRA kernels at `rank`, every token with its own slot."""

    batch: int
    rows: int
    tokens: int
    length: int
    rank: int
    inputs: torch.Tensor  # long: decode ids [B] (a device copy of `Stepper._last`), positions [B] | chunk ids
    #                       [n, S], positions [n, S] | chunk KV rows [n] | LoRA slot per token [B + n S]
    graph: Any = None
    logits: torch.Tensor | None = None
    replays: int = 0
    failed: bool = False

    def _part(self, start: int, n: int) -> torch.Tensor:
        return self.inputs[start: start + n]

    @property
    def ids(self) -> torch.Tensor:
        return self._part(0, self.batch)

    @property
    def pos(self) -> torch.Tensor:
        return self._part(self.batch, self.batch)

    @property
    def chunk_ids(self) -> torch.Tensor:
        return self._part(2 * self.batch, self.rows * self.tokens).view(self.rows, self.tokens)

    @property
    def chunk_pos(self) -> torch.Tensor:
        return self._part(2 * self.batch + self.rows * self.tokens, self.rows * self.tokens).view(self.rows, self.tokens)

    @property
    def kv(self) -> torch.Tensor:
        return self._part(2 * self.batch + 2 * self.rows * self.tokens, self.rows)

    @property
    def slots(self) -> torch.Tensor:
        return self.inputs[2 * self.batch + 2 * self.rows * self.tokens + self.rows:]

    def forward(self, st: "Stepper") -> torch.Tensor:
        return st._mixed_forward(self.ids, self.pos, self.chunk_ids, self.chunk_pos, self.kv, self.length)


_AnyGraph = _Graph | _PrefillGraph | _MixedGraph


class Stepper:
    """`api.RowStepper` for one causal LM (sdpa or eager attention).

    `lora`: the LoRA facade setting rows' adapters (`multilora.MultiLoraModel`); None = a model
    without LoRA layers (every row must then be a base row). `graph_ranks`: capture decode steps
    as CUDA graphs, with the LoRA kernels at each of these ranks (ascending; what
    ``lora.decode_rank`` returns for any row); None = eager (and always without CUDA); ``(0,)``
    for a model without LoRA layers.
    """

    def __init__(self, model: nn.Module, limits: StepLimits, *, lora: LoraRows | None, eos_token_ids: Sequence[int],
                 pad_token_id: int, graph_ranks: Sequence[int] | None = None) -> None:
        attn = getattr(model.config, "_attn_implementation", None) or "eager"
        if attn not in SUPPORTED_ATTENTION:
            raise EngineError(f"continuous batching supports attention {SUPPORTED_ATTENTION}, model uses {attn!r}")
        self.model = model
        self.limits = limits
        self.lora = lora
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.eos_token_ids = sorted(self.eos)
        self.pad_token_id = int(pad_token_id)
        self.device = next(model.parameters()).device
        self.vocab = int(model.get_input_embeddings().num_embeddings)
        self.graphs = bool(graph_ranks) and self.device.type == "cuda"
        self.graph_ranks = sorted({int(r) for r in graph_ranks}) if self.graphs else []
        self.float_mask = attn == "eager"
        self.mask_dtype = next(model.parameters()).dtype
        self._prefill_shapes = prefill_shapes(limits) if self.graphs else []
        # mixed steps: joining rows' chunks in the decode forward (`_decode`); with graphs only in the
        # captured chunk shapes (none fit: separate prefill forwards, as without mixing)
        shapes = mixed_shapes(limits) if self.graphs else []
        self.mixed = (self.graphs if limits.mixed is None else bool(limits.mixed)) and (bool(shapes) or not self.graphs)
        self._mixed_shapes = shapes if self.mixed else []  # what warmup captures
        self._inner_attention = inner_attention(model) if self.mixed else None
        # a spare KV row for the padding rows of captured prefills and mixed steps
        self.cache = RowCache(model.config.num_hidden_layers, limits.max_rows, limits.max_len,
                              spare_rows=1 if self._prefill_shapes or (self.mixed and self.graphs) else 0)
        self._arange = torch.arange(limits.max_len, device=self.device)
        self._rows: dict[int, _Row] = {}  # add order = prefill order
        self._by_kv: list[_Row | None] = [None] * limits.max_rows
        self._free = list(range(limits.max_rows))  # a heap: the lowest free KV row first
        self._uses: Counter[str] = Counter()
        self._batch_buckets = batch_buckets(limits)
        self._len_buckets = length_buckets(limits.max_len)
        self._graphs: dict[tuple[int, int, int], _Graph] = {}  # (batch, key length, rank)
        self._prefill_lens = prefill_length_buckets(limits.max_len)
        self._prefill_graphs: dict[tuple[int, int, int], _PrefillGraph] = {}  # (rows, tokens, key length)
        self._mixed_graphs: dict[tuple[int, int, int, int], _MixedGraph] = {}  # (batch, rows, tokens, key length)
        self._pool = None  # one CUDA graph memory pool for every bucket (replays never overlap)
        self.captures = 0
        self.captures_after_warmup = 0
        self.capture_failures = 0
        self.last_capture_error = ""
        self.warmed_up = False
        self.prefill_kernel_launches = 0  # `warmup`'s launches compiling the prefill kernels' variants
        self.rows_moved = 0  # rows moved down into a free KV row (`_compact`)
        self.steps = 0
        self.decode_steps = 0
        self.prefill_forwards = 0
        self.prefill_replays = 0  # prefill forwards served by a captured graph
        self.mixed_steps = 0  # decode steps that carried prompt chunks
        self.mixed_replays = 0  # mixed steps served by a captured graph
        self.mixed_prompt_tokens = 0  # prompt tokens prefilled in mixed steps
        self._decoding: list[_Row] | None = None  # between a step's two phases: its decoding rows
        self._mix = False  # between a step's two phases: its decode forward carries prompt chunks (`_mixes`)
        self.device_time = DeviceTime(self.device)
        # overlap: a step's tokens are read back while the next step runs (`_pending`, `_due`)
        self.overlap = self.graphs if limits.overlap is None else bool(limits.overlap)
        self._pending: list[_Pending] = []  # forwards whose tokens the host has not read, oldest first
        self._due = 0  # how many of `_pending` this step's decode_phase resolves (the earlier steps')
        # each KV row's last picked token, on the device: the next decode step's input, never read
        # back for it (a decode step's ids need no host round trip, so a step can be queued
        # before the previous one's tokens reach the host); pad where no row has picked one
        self._last = torch.full((limits.max_rows + self.cache.spare_rows,), self.pad_token_id, dtype=torch.long,
                                device=self.device)
        self.past_end = 0  # row computations queued past a row's end (overlap: EOS seen one step late)
        self.pageable_copies = 0  # copies made from plain memory for want of page-locked memory (they wait)
        # KV rows summed over steps by what they did: decoding, prefilling or waiting to (joining),
        # ended but not delivered yet (ending, overlap), free
        self.row_steps: Counter[str] = Counter()

    # -- rows -----------------------------------------------------------------
    def add(self, row_id: int, row: GenerationRow) -> None:
        if row_id in self._rows:
            raise EngineError(f"row {row_id} is already running")
        try:
            validate_rows([row])
        except EngineError as exc:
            raise type(exc)(str(exc).replace("row 0:", f"row {row_id}:", 1)) from None
        p = row.params
        kw = generation_kwargs(p, p.max_new_tokens, self.eos_token_ids, self.pad_token_id)  # refuses temperature <= 0
        prompt = [int(t) for t in row.input_ids]
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise EngineError(f"row {row_id}: token ids must lie in 0..{self.vocab - 1}")
        if len(prompt) + p.max_new_tokens > self.limits.max_len:
            raise RowTooLong(f"row {row_id}: prompt of {len(prompt)} tokens + max_new_tokens {p.max_new_tokens} "
                             f"exceeds the {self.limits.max_len} tokens a KV row holds")
        slot = self._resolve([row.adapter])[0]
        rank = self._rank_of(slot)
        if not self._free:
            raise CacheFull(f"all {self.limits.max_rows} KV rows are in use")
        pick = None
        if p.do_sample:
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            pick = picker(kw, torch.Generator(device=self.device).manual_seed(int(seed)))
        kv = heapq.heappop(self._free)
        r = _Row(row_id, kv, prompt, row.adapter, slot, rank, p, pick, added=self.steps)
        self._rows[row_id] = r
        self._by_kv[kv] = r
        if row.adapter is not None:
            self._uses[row.adapter] += 1

    def cancel(self, row_id: int) -> None:
        r = self._rows.get(row_id)
        if r is not None:
            self._release(r)

    def _release(self, r: _Row) -> None:
        del self._rows[r.row_id]
        self._by_kv[r.kv] = None
        heapq.heappush(self._free, r.kv)
        if r.adapter is not None:
            self._uses[r.adapter] -= 1
            if not self._uses[r.adapter]:
                del self._uses[r.adapter]

    def rows(self) -> int:
        return len(self._rows)

    def free_rows(self) -> int:
        return len(self._free)

    def uses(self, adapter_name: str) -> int:
        return self._uses.get(adapter_name, 0)

    def kv_utilisation(self) -> float:
        rows = list(self._rows.values())  # a snapshot (one C call), so `describe` from a status thread cannot trip
        return sum(r.held for r in rows) / (self.limits.max_rows * self.limits.max_len)

    # -- the step -------------------------------------------------------------
    def step(self) -> list[RowEvent]:
        return self.prefill_phase() + self.decode_phase()

    def prefill_phase(self) -> list[RowEvent]:
        """A step's first half: compact the KV rows, note the rows decoding now, prefill (unless
        deferred): the events of rows whose prompt completed (their first tokens); [] with overlap,
        where they come with the next step's events."""
        self._decoding = None
        self._mix = False
        self._due = len(self._pending)
        if not self._rows:
            return self._deliver(len(self._pending))  # only cancelled rows' tokens can be left: no events
        with torch.inference_mode():
            self._compact()
            decoding = [r for r in self._by_kv if r is not None and r.decoding]
            joining = sum(r.filled < len(r.prompt) for r in self._rows.values())
            self.row_steps.update(decoding=len(decoding), joining=joining, free=len(self._free),
                                  ending=len(self._rows) - len(decoding) - joining)
            self._mix = bool(decoding) and self._mixes()
            if not (self._mix or (decoding and self._defer_prefill())):
                self._prefill()
        self._decoding = decoding
        return [] if self.overlap else self._deliver(len(self._pending))

    def decode_phase(self) -> list[RowEvent]:
        """A step's second half: one decode forward for the rows that were decoding when
        `prefill_phase` began (those cancelled since left out; their KV rows run as holes). Without
        overlap its events; with overlap it queues the forward, then reads back the previous
        step's tokens (the device runs this step meanwhile) and returns their events."""
        due = self._due if self.overlap else None
        self._due = 0
        if self._decoding is not None:
            decoding = [r for r in self._decoding if self._rows.get(r.row_id) is r]
            self._decoding = None
            if decoding:
                with torch.inference_mode():
                    self._decode(decoding)
            self.steps += 1
        return self._deliver(len(self._pending) if due is None else due)

    def _compact(self) -> None:
        """Keep the rows in KV rows ``[0, rows)``: a row above a free KV row moves down into it (its
        cached keys and values copied once, `RowCache.move_row`). Without it a row leaving below
        others leaves a hole the decode batch ``[0, B)`` still computes as a dummy row at every
        step until the row above finishes: work in proportion to the rows on a CPU, and a larger
        graph bucket on a GPU."""
        while self._free and self._rows:
            low = self._free[0]
            high = max(r.kv for r in self._rows.values())
            if low > high:
                return
            r = self._by_kv[high]
            self.cache.move_row(high, low, r.held)
            self._last[low].copy_(self._last[high])
            heapq.heapreplace(self._free, high)
            self._by_kv[low], self._by_kv[high] = r, None
            r.kv = low
            self.rows_moved += 1

    def _defer_prefill(self) -> bool:
        """With graph-replayed decode steps a prefill forward costs mostly a fixed amount whatever its
        rows (a captured one its kernels' device floor, an eager one the host time launching every
        layer's kernels): so rows that join while others decode wait up to `prefill_wait_steps`
        steps and are prefilled together, unless their prompts already fill a `prefill_chunk` or a
        prompt is part-way prefilled (its next chunk runs at once). They wait even when no KV row is
        free: under saturation a decoding row ends at almost every step and its KV row is refilled
        at once, so waiting gathers those joins into one forward instead of one prefill forward (as
        dear as a decode step or more) in nearly every step. Eagerly (a CPU) a forward costs about
        its tokens, so waiting would only delay the first token: rows join at once."""
        wait = self.limits.prefill_wait_steps
        if not self.graphs or not wait:
            return False
        pending = [r for r in self._rows.values() if r.filled < len(r.prompt)]
        if not pending or any(r.filled for r in pending):
            return False
        if sum(len(r.prompt) for r in pending) >= self.limits.prefill_chunk:
            return False
        return self.steps - min(r.added for r in pending) < wait

    def _prefill(self) -> None:
        """This step's chunks (rows in add order, until the budget is spent), in as few forwards as
        padding allows (captured graphs where a bucket fits, else eager); rows whose prompt
        completes get their first token (picked on the device, `_pending`)."""
        budget = self.limits.prefill_chunk
        chunks: list[tuple[_Row, int]] = []
        for r in self._rows.values():
            if budget <= 0:
                break
            if r.filled < len(r.prompt):
                n = min(len(r.prompt) - r.filled, budget)
                budget -= n
                chunks.append((r, n))
        if self._prefill_shapes:
            groups = self._pack_for_graphs(chunks)
        else:
            groups = _pack(chunks, PACK_FLOOR) if self.graphs else _pack(chunks, spare=CPU_FORWARD_TOKENS)
        for group in groups:
            started = self.device_time.start()
            logits = self._replay_prefill(group) if self._prefill_shapes else None
            if logits is None:
                logits = self._prefill_forward(group)
            self.device_time.stop("prefill", started)
            for r, n in group:
                r.filled += n
            self.prefill_forwards += 1
            done = [i for i, (r, _) in enumerate(group) if r.filled == len(r.prompt)]
            if done:
                self._pick([group[i][0] for i in done], logits.index_select(0, self._index(done)))

    def _chunk_ids(self, group: list[tuple[_Row, int]], S: int) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and positions of these chunks left-padded to `S`: a pad token sits at the row's
        first position after its chunk (not written yet: the row's next token overwrites it before
        anything reads it), so every row's last real token is the last column."""
        ids, pos = [], []
        for r, n in group:
            s, pad = r.filled, S - n
            ids.append([self.pad_token_id] * pad + r.prompt[s: s + n])
            pos.append([s + n] * pad + list(range(s, s + n)))
        return ids, pos

    def _prefill_forward(self, group: list[tuple[_Row, int]]) -> torch.Tensor:
        """One eager forward over these rows' chunks, left-padded to the longest -> [n, V]."""
        S = max(n for _, n in group)
        ids, pos = self._chunk_ids(group, S)
        length = min(round_up(max(r.filled + n for r, n in group) + 1, EAGER_LEN), self.limits.max_len)
        ids_t, pos_t = self._index([ids, pos]).unbind(0)
        rows = [r for r, _ in group]
        with self._eager(rows):
            return self._chunk_forward(ids_t, pos_t, self._index([r.kv for r in rows]), length)

    def _chunk_forward(self, ids: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor, length: int) -> torch.Tensor:
        """[n, S] chunk tokens at positions [n, S] of KV rows [n], keys [0, length) -> [n, V] logits of
        each row's last column; what a prefill graph captures (mask built inside)."""
        mask = (self._arange[:length].view(1, 1, length) <= pos.unsqueeze(-1)).unsqueeze(1)  # [n, 1, S, T]
        self.cache.for_prefill(kv, pos, length)
        out = self.model(input_ids=ids, attention_mask=self._as_mask(mask), position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    # -- captured prefill -------------------------------------------------------
    def _prefill_shape(self, rows: int, tokens: int) -> tuple[int, int] | None:
        """The smallest captured (rows, tokens) shape holding `rows` chunks of at most `tokens`."""
        fits = [(n, S) for n, S in self._prefill_shapes if n >= rows and S >= tokens]
        return min(fits, key=lambda sh: (sh[0] * sh[1], sh[0])) if fits else None

    def _pack_for_graphs(self, chunks: list[tuple[_Row, int]]) -> list[list[tuple[_Row, int]]]:
        """Chunks into prefill forwards, longest first: a chunk joins the forward before it while
        a captured shape holds them all and the padded tokens stay within twice the real ones
        (or one `PREFILL_GRAPH_MIN_TOKENS` x 8 forward); a chunk no shape holds runs alone."""
        groups: list[list[tuple[_Row, int]]] = []
        for item in sorted(chunks, key=lambda c: -c[1]):
            g = groups[-1] if groups else None
            shape = self._prefill_shape(len(g) + 1, g[0][1]) if g is not None else None
            if shape is not None and (shape[0] * shape[1] <= 2 * (sum(n for _, n in g) + item[1])
                                      or shape[0] * shape[1] <= PREFILL_GRAPH_MIN_TOKENS * PREFILL_GRAPH_ROWS[-1]):
                g.append(item)
            else:
                groups.append([item])
        return groups

    def _replay_prefill(self, group: list[tuple[_Row, int]]) -> torch.Tensor | None:
        """These chunks through a captured prefill graph -> [len(group), V] logits; None where no
        captured shape or key length holds them, or the bucket cannot be captured (then eager)."""
        shape = self._prefill_shape(len(group), max(n for _, n in group))
        need = max(r.filled + n for r, n in group) + 1
        length = next((t for t in self._prefill_lens if t >= need), None)
        if shape is None or length is None:
            return None
        n_rows, S = shape
        g = self._prefill_graph(n_rows, S, length)
        if g.failed:
            return None
        rows = [r for r, _ in group]
        self._check(rows)
        ids, pos = self._chunk_ids(group, S)
        pad = n_rows - len(group)
        flat = [t for row in ids for t in row] + [self.pad_token_id] * (pad * S)
        flat += [p for row in pos for p in row] + [0] * (pad * S)
        flat += [r.kv for r in rows] + [self.cache.scratch_row] * pad
        flat += [r.slot for r in rows] + [0] * pad
        logits = self._run_graph(g, flat)
        if logits is None:
            return None
        self.prefill_replays += 1
        return logits[: len(group)]

    def _prefill_graph(self, rows: int, tokens: int, length: int) -> _PrefillGraph:
        g = self._prefill_graphs.get((rows, tokens, length))
        if g is None:
            g = self._prefill_graphs[(rows, tokens, length)] = _PrefillGraph(
                rows, tokens, length, self.graph_ranks[-1],
                torch.zeros(2 * rows * tokens + 2 * rows, dtype=torch.long, device=self.device))
        return g

    def _decode(self, decoding: list[_Row]) -> None:
        """One forward over KV rows [0, B); rows not in `decoding` are dummies that write at their
        own next position (a free row anywhere), so no live row's cache changes. Each row's input is
        its last picked token, read on the device (`_last`; a dummy reads whatever its KV row holds).
        Mixed (`self._mix`, set by `_mixes` in `prefill_phase`): joining rows' next prompt chunks
        (`_mixed_chunks`) ride in the same forward (`_decode_mixed`)."""
        n = max(r.kv for r in decoding) + 1
        B = _first_at_least(self._batch_buckets, n) if self.graphs else n
        feed = {r.kv for r in decoding}
        rows = [r if r is not None and r.kv in feed else None for r in self._by_kv[:B]]
        slots = [r.slot if r is not None else 0 for r in rows]
        pos = [r.held if r is not None else 0 for r in self._by_kv[:B]]
        chunks = self._mixed_chunks() if self._mix else []
        if chunks:
            self._decode_mixed(decoding, rows, slots, pos, chunks)
            return
        need = max(pos) + 1
        logits = None
        started = self.device_time.start()
        if self.graphs:
            self._check(rows)
            rank = _first_at_least(self.graph_ranks, max(r.rank for r in decoding))
            logits = self._replay(self._graph(B, _first_at_least(self._len_buckets, need), rank), pos, slots)
        if logits is None:  # eager: no graphs, or this bucket could not be captured
            with self._eager(rows):
                logits = self._decode_forward(self._last[:B].view(B, 1), self._index(pos).view(B, 1),
                                              min(round_up(need, EAGER_LEN), self.limits.max_len))
        self.device_time.stop("decode", started)
        self.decode_steps += 1
        kv = self._index([r.kv for r in decoding])
        self._pick(decoding, logits.index_select(0, kv), kv)

    # -- mixed steps ----------------------------------------------------------
    def _mixes(self) -> bool:
        """Whether this step's joining prompts ride in its decode forward: only when what they still
        need fits the `mixed_tokens` a mixed step carries. A mixed step costs the decode step a
        fixed part plus more per token than a prefill forward does (every token is its own row in
        the LoRA kernels), so a bigger backlog goes through a separate prefill forward
        (`prefill_chunk` tokens in one; bench/RESULTS.md)."""
        if not self.mixed:
            return False
        backlog = sum(len(r.prompt) - r.filled for r in self._rows.values() if r.filled < len(r.prompt))
        return 0 < backlog <= self.limits.mixed_tokens

    def _mixed_chunks(self) -> list[tuple[_Row, int]]:
        """The prompt chunks this step's decode forward carries: the first 1, 2 or 4 joining rows (add
        order), each up to an equal share of `mixed_tokens` (with graphs: the largest captured chunk
        for that many rows), whichever count prefills the most tokens (fewer rows on a tie)."""
        joining = [r for r in self._rows.values() if r.filled < len(r.prompt)][: MIXED_ROWS[-1]]
        best: list[tuple[_Row, int]] = []
        for n in MIXED_ROWS:
            if n > len(joining):
                break
            caps = [S for k, S in self._mixed_shapes if k == n] if self.graphs else [self.limits.mixed_tokens // n]
            if not caps or not max(caps):
                continue
            chunks = [(r, min(len(r.prompt) - r.filled, max(caps))) for r in joining[:n]]
            if sum(c for _, c in chunks) > sum(c for _, c in best):
                best = chunks
        return best

    def _mixed_shape(self, chunks: list[tuple[_Row, int]]) -> tuple[int, int]:
        """(rows, tokens) the chunks run as: the smallest captured shape holding them; eagerly their own."""
        longest = max(c for _, c in chunks)
        if not self.graphs:
            return len(chunks), longest
        return min(((n, S) for n, S in self._mixed_shapes if n >= len(chunks) and S >= longest),
                   key=lambda sh: (sh[0] * sh[1], sh[0]))

    def _decode_mixed(self, decoding: list[_Row], rows: list[_Row | None], slots: list[int], pos: list[int],
                      chunks: list[tuple[_Row, int]]) -> None:
        """One forward of the decode rows [0, B) and the prompt chunks (`mixed_attention`): the decode
        rows' tokens and the first tokens of rows whose prompt completes, picked together."""
        B = len(rows)
        n_rows, S = self._mixed_shape(chunks)
        ids, cpos = self._chunk_ids(chunks, S)
        need = max(max(pos), *(r.filled + c for r, c in chunks)) + 1
        pad = n_rows - len(chunks)
        ids += [[self.pad_token_id] * S] * pad
        cpos += [[0] * S] * pad
        kv = [r.kv for r, _ in chunks] + ([self.cache.scratch_row] * pad if pad else [])
        token_rows = rows + [r for r, _ in chunks for _ in range(S)] + [None] * (pad * S)
        logits = None
        started = self.device_time.start()
        if self.graphs:
            self._check(token_rows)
            g = self._mixed_graph(B, n_rows, S, _first_at_least(self._len_buckets, need))
            if not g.failed:
                g.ids.copy_(self._last[:B])
                flat = pos + [t for row in ids for t in row] + [p for row in cpos for p in row] + kv
                flat += slots + [r.slot for r, _ in chunks for _ in range(S)] + [0] * (pad * S)
                logits = self._run_graph(g, flat, g.inputs[B:])
                if logits is not None:
                    self.mixed_replays += 1
        if logits is None:  # eager: no graphs, or this bucket could not be captured
            ids_t, cpos_t = self._index([ids, cpos]).unbind(0)
            with self._eager(token_rows):
                logits = self._mixed_forward(self._last[:B], self._index(pos), ids_t, cpos_t, self._index(kv),
                                             min(round_up(need, EAGER_LEN), self.limits.max_len))
        self.device_time.stop("mixed", started)
        self.decode_steps += 1
        self.mixed_steps += 1
        for r, c in chunks:
            r.filled += c
            self.mixed_prompt_tokens += c
        done = [i for i, (r, _) in enumerate(chunks) if r.filled == len(r.prompt)]
        picked = decoding + [chunks[i][0] for i in done]
        at = [r.kv for r in decoding] + [B + i * S + S - 1 for i in done]  # a chunk's last column is its last token
        self._pick(picked, logits.index_select(0, self._index(at)))

    def _mixed_forward(self, ids: torch.Tensor, pos: torch.Tensor, chunk_ids: torch.Tensor, chunk_pos: torch.Tensor,
                       chunk_kv: torch.Tensor, length: int) -> torch.Tensor:
        """Decode ids [B] at positions [B] (rows [0, B)) and chunks [n, S] at positions [n, S] of KV rows
        [n], keys [0, length), as ONE forward of [B + n S, 1] tokens -> [B + n S, V] logits; what a
        mixed graph captures (masks built inside)."""
        B = ids.shape[0]
        n, S = chunk_ids.shape
        ar = self._arange[:length]
        chunk_mask = self._as_mask((ar.view(1, 1, length) <= chunk_pos.unsqueeze(-1)).unsqueeze(1))  # [n, 1, S, T]
        decode_mask = self._as_mask((ar.view(1, length) <= pos.view(B, 1)).view(B, 1, 1, length)) if B else None
        layout = MixedLayout(B, n, S, length, chunk_kv, decode_mask, chunk_mask, self._inner_attention)
        self.cache.for_mixed(pos.view(B), chunk_kv, chunk_pos, length)
        with mixed_forward(self.model):  # the 4D mask only tells transformers not to build one
            out = self.model(input_ids=torch.cat([ids.view(B), chunk_ids.reshape(-1)]).view(-1, 1),
                             attention_mask=chunk_mask, position_ids=torch.cat([pos.view(B), chunk_pos.reshape(-1)]).view(-1, 1),
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1, row_layout=layout)
        return out.logits[:, -1]

    def _mixed_graph(self, B: int, rows: int, tokens: int, length: int) -> _MixedGraph:
        g = self._mixed_graphs.get((B, rows, tokens, length))
        if g is None:
            n = rows * tokens
            g = self._mixed_graphs[(B, rows, tokens, length)] = _MixedGraph(
                B, rows, tokens, length, self.graph_ranks[-1],
                torch.zeros(3 * B + 3 * n + rows, dtype=torch.long, device=self.device))
        return g

    def _decode_forward(self, ids: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        """[B, 1] ids at positions [B, 1] -> [B, V] logits; what a graph captures (mask built inside)."""
        B = ids.shape[0]
        mask = (self._arange[:length].view(1, length) <= pos).view(B, 1, 1, length)
        self.cache.for_decode(pos.view(B), length)
        out = self.model(input_ids=ids, attention_mask=self._as_mask(mask), position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _pick(self, rows: list[_Row], logits: torch.Tensor, kv: torch.Tensor | None = None) -> None:
        """Pick each row's next token from its raw logits [N, V] on the device: into `_last` (the rows'
        next decode input) and `_pending` (for the host; with overlap copied back without waiting).
        The rows' counts advance now; whether a token ends its row (EOS, length) is `_deliver`'s."""
        greedy = [i for i, r in enumerate(rows) if r.pick is None]
        if len(greedy) == len(rows):
            chosen = logits.argmax(-1)
        else:
            chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
            if greedy:
                g = self._index(greedy)
                chosen[g] = logits.index_select(0, g).argmax(-1)
            for i, r in enumerate(rows):
                if r.pick is not None:
                    chosen[i] = r.pick(logits[i: i + 1])[0]
        self._last.index_copy_(0, self._index([r.kv for r in rows]) if kv is None else kv, chosen)
        ask = [i for i, r in enumerate(rows) if r.params.logprobs]
        lps = None
        if ask:
            a = self._index(ask)
            k = max(rows[i].params.logprobs for i in ask)
            lps = lp.step(logits.index_select(0, a), chosen.index_select(0, a), k)
        for r in rows:
            r.generated += 1
        p = _Pending(rows, [r.generated for r in rows], chosen, ask, lps)
        if self.overlap and chosen.is_cuda:
            try:  # into page-locked memory (a copy back that does not wait)
                p.tokens = chosen.to("cpu", non_blocking=True)
                if lps is not None:
                    p.logprobs = tuple(t.to("cpu", non_blocking=True) for t in lps)
                p.ready = torch.cuda.Event()
                p.ready.record()
            except RuntimeError:  # none left: `_deliver` reads them from the device (a wait)
                p.tokens, p.logprobs, p.ready = chosen, lps, None
                self.pageable_copies += 1
        self._pending.append(p)

    def _deliver(self, n: int) -> list[RowEvent]:
        """The events of the `n` oldest pending forwards (waiting for their tokens to reach the host:
        without overlap the step's one wait for the device); rows that ended meanwhile (cancelled,
        or an earlier token was their EOS) are skipped; ended rows' KV rows are freed."""
        done, self._pending = self._pending[:n], self._pending[n:]
        events: list[RowEvent] = []
        for p in done:
            if p.ready is not None:
                p.ready.synchronize()
            tokens = p.tokens.tolist()
            lps: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}
            if p.logprobs is not None:
                c, ti, tv = p.logprobs
                for i, cv, ids, vals in zip(p.ask, c.tolist(), ti.tolist(), tv.tolist()):
                    k = p.rows[i].params.logprobs
                    lps[i] = (cv, tuple(zip(ids[:k], vals[:k])))
            for i, (r, t, count) in enumerate(zip(p.rows, tokens, p.counts)):
                if self._rows.get(r.row_id) is not r:
                    self.past_end += 1
                    continue
                if t in self.eos:
                    events.append(RowEvent(r.row_id, None, "stop"))
                    self._release(r)
                    continue
                finished = "length" if count >= r.params.max_new_tokens else None
                lpv, top = lps.get(i, (None, None))
                events.append(RowEvent(r.row_id, t, finished, lpv, top))
                if finished:
                    self._release(r)
        if done:
            self.device_time.collect()
        return events

    def _index(self, values: Sequence[Any], into: torch.Tensor | None = None) -> torch.Tensor:
        """A long tensor of `values` on the device (or copied into `into`), from page-locked memory
        without waiting for the device's queued work (a pageable copy waits for it: no overlap); the
        caching host allocator keeps the staging buffer until the copy has run. With no page-locked
        memory left (the host tier can take it all) the copy comes from plain memory: it waits, and
        is still right."""
        host = torch.tensor(values, dtype=torch.long)
        if into is not None:
            host = host.view(into.shape)
        if self.device.type == "cuda":
            try:
                host = host.pin_memory()
            except RuntimeError:
                self.pageable_copies += 1
            if into is None:
                return host.to(self.device, non_blocking=True)
        return host if into is None else into.copy_(host, non_blocking=True)

    # -- LoRA -----------------------------------------------------------------
    def _resolve(self, names: Sequence[str | None]) -> list[int]:
        if self.lora is None:
            if any(n is not None for n in names):
                raise EngineError("this model has no LoRA layers: rows must use the base model")
            return [0] * len(names)
        return self.lora.resolve_slots(list(names), len(names))

    def _eager(self, rows: Sequence[_Row | None]) -> ContextManager[None]:
        """The eager LoRA batch for these rows (None = a dummy base row). Adapters are named, so
        the names must still map to the slots resolved at `add` (the engine refuses to delete
        an adapter in use; this catches a facade used behind its back)."""
        if self.lora is None:
            return contextlib.nullcontext()
        return self.lora.batch(self._check(rows), len(rows))

    def _check(self, rows: Sequence[_Row | None]) -> list[str | None]:
        names = [r.adapter if r is not None else None for r in rows]
        if self._resolve(names) != [r.slot if r is not None else 0 for r in rows]:
            raise EngineError("a running row's adapter moved to another slot (deleted while in use?)")
        return names

    def _static(self, g: "_AnyGraph") -> ContextManager[None]:
        if self.lora is None or not g.rank:
            return contextlib.nullcontext()
        return self.lora.static_batch(g.slots, g.rank)

    def _as_mask(self, m: torch.Tensor) -> torch.Tensor:
        if not self.float_mask:
            return m
        return (~m).to(self.mask_dtype) * torch.finfo(self.mask_dtype).min

    # -- graphs ---------------------------------------------------------------
    def _replay(self, g: _Graph, pos: list[int], slots: list[int]) -> torch.Tensor | None:
        """The bucket's graph run on these positions and slots and the rows' last tokens (captured now
        if warmup did not); None when the bucket cannot be captured (the step then runs eagerly)."""
        if g.failed:
            return None
        g.inputs[0].copy_(self._last[: g.batch])
        return self._run_graph(g, [pos, slots], g.inputs[1:])

    def _run_graph(self, g: "_AnyGraph", host_inputs: list, into: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
        """Copy `host_inputs` into the graph's input tensor (or its part `into`: one host-to-device
        copy), capture it if warmup did not, replay; its logits, or None when it cannot be captured."""
        self._index(host_inputs, g.inputs if into is None else into)
        if g.graph is None:
            if not self._try_capture(g):
                return None
            self.captures_after_warmup += 1
        g.graph.replay()
        g.replays += 1
        return g.logits

    def _graph(self, B: int, length: int, rank: int) -> _Graph:
        g = self._graphs.get((B, length, rank))
        if g is None:
            g = self._graphs[(B, length, rank)] = _Graph(B, length, rank,
                                                         torch.zeros(3, B, dtype=torch.long, device=self.device))
        return g

    def _rank_of(self, slot: int) -> int:
        """The rank bucket a row on this slot needs in a captured step."""
        if not self.graphs or self.lora is None or not slot:
            return self.graph_ranks[0] if self.graphs else 0
        rank = self.lora.decode_rank([slot])
        if rank is None or rank > self.graph_ranks[-1]:
            raise EngineError(f"adapter rank {rank} is beyond what the captured LoRA kernels serve")
        return rank

    def _try_capture(self, g: "_AnyGraph") -> bool:
        try:
            self._capture(g)
            return True
        except Exception as exc:  # e.g. out of memory while capturing: that bucket's steps run eagerly
            g.failed = True
            self.capture_failures += 1
            self.last_capture_error = f"{type(exc).__name__}: {exc}"[:300]
            return False

    def _capture(self, g: "_AnyGraph") -> None:
        """Run the forward once on a side stream (kernel JIT, workspaces), then capture it. The run
        writes the same keys/values the captured forward writes (same inputs), so it is harmless."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self._static(g):
            g.forward(self)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a status thread touching CUDA meanwhile does not invalidate the capture
        with self._static(g), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            g.logits = g.forward(self)
        g.graph = graph
        self.captures += 1

    def warmup(self) -> None:
        """Capture every (batch, key-length, rank) bucket's decode step and every (rows, tokens,
        key-length) prefill shape now. Needs no row running: the decode captures write dummy keys
        at position 0 of rows [0, B), the prefill captures into the scratch row."""
        if not self.graphs:
            self.warmed_up = True
            return
        if self._rows:
            raise EngineError("warmup needs an idle stepper (the captures write into KV rows)")
        if self.lora is not None:  # eager prefill's kernels: compiled now, not on a request's path
            self.prefill_kernel_launches = self.lora.warm_prefill_kernels()
        with torch.inference_mode():
            for B, length, rank in itertools.product(self._batch_buckets, self._len_buckets, self.graph_ranks):
                g = self._graph(B, length, rank)
                if g.graph is None and not g.failed:
                    g.inputs.zero_()
                    g.inputs[0].fill_(self.pad_token_id)
                    self._try_capture(g)
            for (n, S), length in itertools.product(self._prefill_shapes, self._prefill_lens):
                p = self._prefill_graph(n, S, length)
                if p.graph is None and not p.failed:  # every row a padding row: writes only the scratch row
                    p.inputs.zero_()
                    p.ids.fill_(self.pad_token_id)
                    p.kv.fill_(self.cache.scratch_row)
                    self._try_capture(p)
            for B, (n, S), length in itertools.product(self._batch_buckets, self._mixed_shapes, self._len_buckets):
                m = self._mixed_graph(B, n, S, length)
                if m.graph is None and not m.failed:  # dummy keys at position 0 of rows [0, B), chunks in the scratch row
                    m.inputs.zero_()
                    m.ids.fill_(self.pad_token_id)
                    m.chunk_ids.fill_(self.pad_token_id)
                    m.kv.fill_(self.cache.scratch_row)
                    self._try_capture(m)
        self.warmed_up = True

    def describe(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "graph_ranks": list(self.graph_ranks),
                "captures": self.captures, "captures_after_warmup": self.captures_after_warmup,
                "prefill_kernel_launches": self.prefill_kernel_launches,
                "warmed_up": self.warmed_up, "capture_failures": self.capture_failures,
                "last_capture_error": self.last_capture_error,
                "buckets": [{"batch": g.batch, "kv_len": g.length, "rank": g.rank, "captured": g.graph is not None,
                             "replays": g.replays} for g in list(self._graphs.values())],
                "prefill_buckets": [{"rows": p.rows, "tokens": p.tokens, "kv_len": p.length, "rank": p.rank,
                                     "captured": p.graph is not None, "replays": p.replays}
                                    for p in list(self._prefill_graphs.values())],
                "prefill_replays": self.prefill_replays,
                "mixed": self.mixed, "mixed_tokens": self.limits.mixed_tokens, "mixed_steps": self.mixed_steps,
                "mixed_replays": self.mixed_replays, "mixed_prompt_tokens": self.mixed_prompt_tokens,
                "mixed_graphs": sum(m.graph is not None for m in list(self._mixed_graphs.values())),
                "rows": self.rows(), "max_rows": self.limits.max_rows, "max_len": self.limits.max_len,
                "prefill_chunk": self.limits.prefill_chunk, "kv_utilisation": self.kv_utilisation(),
                "kv_bytes": self.cache.nbytes(), "steps": self.steps, "decode_steps": self.decode_steps,
                "prefill_forwards": self.prefill_forwards, "rows_moved": self.rows_moved,
                "overlap": self.overlap, "past_end": self.past_end, "row_steps": dict(self.row_steps),
                "pageable_copies": self.pageable_copies,
                "device_ms": self.device_time.describe()}
