"""`Stepper`: continuous batching over a per-row KV cache (`api.RowStepper`).

Rows join and leave between any two steps. Each step (`Stepper.step`):

1. prefill: at most ``prefill_chunk`` prompt tokens of joining rows, in the order they were
   added (a long prompt takes several steps, so it never stalls the running rows for more
   than one chunk); the chunks run eagerly, several rows per forward (left-padded, grouped
   so padding at most doubles a forward: `_pack`); the chunk that completes a prompt gives
   that row its first token in this step's events;
2. decode: ONE forward ``[B, 1]`` for every row that was decoding when the step began, each
   row at its own position, with its own LoRA slot, sampling rule and stop condition.

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
Prefill stays eager, so its cost is mostly fixed host time: rows joining while others decode
wait up to ``prefill_wait_steps`` steps to be prefilled in one forward (`_defer_prefill`), and
one forward takes chunks whose padding stays within `PACK_FLOOR` tokens. `warmup` also compiles every variant of its Triton LoRA kernels
(`LoraRows.warm_prefill_kernels`), which Triton would otherwise JIT-compile on a request's path. Without CUDA the same loop runs eagerly: that is how CPU tests check it.

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


def _pack(chunks: list[tuple[Any, int]], floor: int = 0) -> list[list[tuple[Any, int]]]:
    """Group prefill chunks (item, tokens) into forwards, longest first, so that padding at most
    doubles a forward's tokens (a 500-token chunk and a 12-token one run apart) or the forward
    stays within `floor` tokens, padding included (where a forward's cost is mostly its fixed
    host time, one padded forward beats two)."""
    groups: list[list[tuple[Any, int]]] = []
    for item in sorted(chunks, key=lambda c: -c[1]):
        g = groups[-1] if groups else None
        padded = (len(g) + 1) * g[0][1] if g is not None else 0
        if g is not None and (padded <= 2 * (sum(n for _, n in g) + item[1]) or padded <= floor):
            g.append(item)
        else:
            groups.append([item])
    return groups


def _first_at_least(buckets: Sequence[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


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
    generated: int = 0  # new tokens produced (EOS excluded)
    last: int = 0  # the last new token: the next decode step's input

    @property
    def decoding(self) -> bool:
        return self.generated > 0

    @property
    def held(self) -> int:
        """Tokens in the cache = the position the row writes next."""
        return self.filled + max(self.generated - 1, 0)


@dataclass(eq=False)
class _Graph:
    """One captured decode step: everything it reads or writes, at fixed addresses."""

    batch: int
    length: int
    rank: int  # LoRA kernel rank (0: the plain model, no LoRA layers)
    inputs: torch.Tensor  # [3, B] long: token id, position, LoRA slot per row (one H2D copy per step)
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
        self.cache = RowCache(model.config.num_hidden_layers, limits.max_rows, limits.max_len)
        self._arange = torch.arange(limits.max_len, device=self.device)
        self._rows: dict[int, _Row] = {}  # add order = prefill order
        self._by_kv: list[_Row | None] = [None] * limits.max_rows
        self._free = list(range(limits.max_rows))  # a heap: the lowest free KV row first
        self._uses: Counter[str] = Counter()
        self._batch_buckets = batch_buckets(limits)
        self._len_buckets = length_buckets(limits.max_len)
        self._graphs: dict[tuple[int, int, int], _Graph] = {}  # (batch, key length, rank)
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
        if not self._rows:
            return []
        with torch.inference_mode():
            self._compact()
            decoding = [r for r in self._by_kv if r is not None and r.decoding]
            events = [] if decoding and self._defer_prefill() else self._prefill()
            if decoding:
                events += self._decode(decoding)
        self.steps += 1
        return events

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
            heapq.heapreplace(self._free, high)
            self._by_kv[low], self._by_kv[high] = r, None
            r.kv = low
            self.rows_moved += 1

    def _defer_prefill(self) -> bool:
        """With graph-replayed decode steps, an eager prefill forward costs mostly fixed host time
        (launching every layer's kernels), many decode steps' worth whatever its length: so rows that
        join while others decode wait up to `prefill_wait_steps` steps and are prefilled together,
        unless their prompts already fill a `prefill_chunk`, no KV row is left for more to join, or a
        prompt is part-way prefilled (its next chunk runs at once). Eagerly (a CPU) a forward costs
        about its tokens, so waiting would only delay the first token: rows join at once."""
        wait = self.limits.prefill_wait_steps
        if not self.graphs or not wait:
            return False
        pending = [r for r in self._rows.values() if r.filled < len(r.prompt)]
        if not pending or not self._free or any(r.filled for r in pending):
            return False
        if sum(len(r.prompt) for r in pending) >= self.limits.prefill_chunk:
            return False
        return self.steps - min(r.added for r in pending) < wait

    def _prefill(self) -> list[RowEvent]:
        """This step's chunks (rows in add order, until the budget is spent), in as few forwards as
        padding allows; rows whose prompt completes get their first token."""
        budget = self.limits.prefill_chunk
        chunks: list[tuple[_Row, int]] = []
        for r in self._rows.values():
            if budget <= 0:
                break
            if r.filled < len(r.prompt):
                n = min(len(r.prompt) - r.filled, budget)
                budget -= n
                chunks.append((r, n))
        events: list[RowEvent] = []
        for group in _pack(chunks, PACK_FLOOR if self.graphs else 0):
            logits = self._prefill_forward(group)
            done = [i for i, (r, _) in enumerate(group) if r.filled == len(r.prompt)]
            if done:
                events += self._emit([group[i][0] for i in done],
                                     logits.index_select(0, torch.tensor(done, device=logits.device)))
        return events

    def _prefill_forward(self, group: list[tuple[_Row, int]]) -> torch.Tensor:
        """One forward over these rows' chunks, left-padded to the longest: a pad token sits at the
        row's first position after its chunk (not written yet: the row's next token overwrites it
        before anything reads it), so every row's last real token is the last column. -> [n, V]."""
        S = max(n for _, n in group)
        ids, pos = [], []
        for r, n in group:
            s, pad = r.filled, S - n
            ids.append([self.pad_token_id] * pad + r.prompt[s: s + n])
            pos.append([s + n] * pad + list(range(s, s + n)))
        length = min(round_up(max(r.filled + n for r, n in group) + 1, EAGER_LEN), self.limits.max_len)
        host = torch.tensor([ids, pos], dtype=torch.long)
        ids_t, pos_t = host.to(self.device).unbind(0)
        mask = (self._arange[:length].view(1, 1, length) <= pos_t.unsqueeze(-1)).unsqueeze(1)  # [n, 1, S, T]
        rows = [r for r, _ in group]
        self.cache.for_prefill(torch.tensor([r.kv for r in rows], device=self.device), pos_t, length)
        with self._eager(rows):
            out = self.model(input_ids=ids_t, attention_mask=self._as_mask(mask), position_ids=pos_t,
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        for r, n in group:
            r.filled += n
        self.prefill_forwards += 1
        return out.logits[:, -1]

    def _decode(self, decoding: list[_Row]) -> list[RowEvent]:
        """One forward over KV rows [0, B); rows not in `decoding` are dummies that write at their
        own next position (a free row anywhere), so no live row's cache changes."""
        n = max(r.kv for r in decoding) + 1
        B = _first_at_least(self._batch_buckets, n) if self.graphs else n
        feed = {r.kv for r in decoding}
        rows = [r if r is not None and r.kv in feed else None for r in self._by_kv[:B]]
        ids = [r.last if r is not None else self.pad_token_id for r in rows]
        slots = [r.slot if r is not None else 0 for r in rows]
        pos = [r.held if r is not None else 0 for r in self._by_kv[:B]]
        need = max(pos) + 1
        logits = None
        if self.graphs:
            self._check(rows)
            rank = _first_at_least(self.graph_ranks, max(r.rank for r in decoding))
            logits = self._replay(self._graph(B, _first_at_least(self._len_buckets, need), rank), ids, pos, slots)
        if logits is None:  # eager: no graphs, or this bucket could not be captured
            inputs = torch.tensor([ids, pos], dtype=torch.long).to(self.device)
            with self._eager(rows):
                logits = self._decode_forward(inputs[0].view(B, 1), inputs[1].view(B, 1),
                                              min(round_up(need, EAGER_LEN), self.limits.max_len))
        self.decode_steps += 1
        index = torch.tensor([r.kv for r in decoding], device=logits.device)
        return self._emit(decoding, logits.index_select(0, index))

    def _decode_forward(self, ids: torch.Tensor, pos: torch.Tensor, length: int) -> torch.Tensor:
        """[B, 1] ids at positions [B, 1] -> [B, V] logits; what a graph captures (mask built inside)."""
        B = ids.shape[0]
        mask = (self._arange[:length].view(1, length) <= pos).view(B, 1, 1, length)
        self.cache.for_decode(pos.view(B), length)
        out = self.model(input_ids=ids, attention_mask=self._as_mask(mask), position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> list[RowEvent]:
        """Pick each row's next token from its raw logits [N, V]; events; free finished rows."""
        greedy = [i for i, r in enumerate(rows) if r.pick is None]
        if len(greedy) == len(rows):
            chosen = logits.argmax(-1)
        else:
            chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
            if greedy:
                g = torch.tensor(greedy, device=logits.device)
                chosen[g] = logits.index_select(0, g).argmax(-1)
            for i, r in enumerate(rows):
                if r.pick is not None:
                    chosen[i] = r.pick(logits[i: i + 1])[0]
        ask = [i for i, r in enumerate(rows) if r.params.logprobs]
        lps: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}
        if ask:
            k = max(rows[i].params.logprobs for i in ask)
            a = torch.tensor(ask, device=logits.device)
            c, ti, tv = lp.step(logits.index_select(0, a), chosen.index_select(0, a), k)
            for i, cv, ids, vals in zip(ask, c.tolist(), ti.tolist(), tv.tolist()):
                kk = rows[i].params.logprobs
                lps[i] = (cv, tuple(zip(ids[:kk], vals[:kk])))
        events = []
        for i, (r, t) in enumerate(zip(rows, chosen.tolist())):
            if t in self.eos:
                events.append(RowEvent(r.row_id, None, "stop"))
                self._release(r)
                continue
            r.generated += 1
            r.last = t
            done = "length" if r.generated >= r.params.max_new_tokens else None
            lpv, top = lps.get(i, (None, None))
            events.append(RowEvent(r.row_id, t, done, lpv, top))
            if done:
                self._release(r)
        return events

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

    def _static(self, g: _Graph) -> ContextManager[None]:
        if self.lora is None or not g.rank:
            return contextlib.nullcontext()
        return self.lora.static_batch(g.slots, g.rank)

    def _as_mask(self, m: torch.Tensor) -> torch.Tensor:
        if not self.float_mask:
            return m
        return (~m).to(self.mask_dtype) * torch.finfo(self.mask_dtype).min

    # -- graphs ---------------------------------------------------------------
    def _replay(self, g: _Graph, ids: list[int], pos: list[int], slots: list[int]) -> torch.Tensor | None:
        """The bucket's graph run on these inputs (captured now if warmup did not); None when the
        bucket cannot be captured (the step then runs eagerly)."""
        if g.failed:
            return None
        g.inputs.copy_(torch.tensor([ids, pos, slots], dtype=torch.long), non_blocking=False)
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

    def _try_capture(self, g: _Graph) -> bool:
        try:
            self._capture(g)
            return True
        except Exception as exc:  # e.g. out of memory while capturing: that bucket's steps run eagerly
            g.failed = True
            self.capture_failures += 1
            self.last_capture_error = f"{type(exc).__name__}: {exc}"[:300]
            return False

    def _capture(self, g: _Graph) -> None:
        """Run the step once on a side stream (kernel JIT, workspaces), then capture it. The run
        writes the same keys/values the captured step writes (same inputs), so it is harmless."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self._static(g):
            self._decode_forward(g.ids, g.pos, g.length)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a status thread touching CUDA meanwhile does not invalidate the capture
        with self._static(g), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            g.logits = self._decode_forward(g.ids, g.pos, g.length)
        g.graph = graph
        self.captures += 1

    def warmup(self) -> None:
        """Capture every (batch, key-length, rank) bucket's decode step now. Needs no row running:
        the captures write dummy keys at position 0 of rows [0, B)."""
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
        self.warmed_up = True

    def describe(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "graph_ranks": list(self.graph_ranks),
                "captures": self.captures, "captures_after_warmup": self.captures_after_warmup,
                "prefill_kernel_launches": self.prefill_kernel_launches,
                "warmed_up": self.warmed_up, "capture_failures": self.capture_failures,
                "last_capture_error": self.last_capture_error,
                "buckets": [{"batch": g.batch, "kv_len": g.length, "rank": g.rank, "captured": g.graph is not None,
                             "replays": g.replays} for g in list(self._graphs.values())],
                "rows": self.rows(), "max_rows": self.limits.max_rows, "max_len": self.limits.max_len,
                "prefill_chunk": self.limits.prefill_chunk, "kv_utilisation": self.kv_utilisation(),
                "kv_bytes": self.cache.nbytes(), "steps": self.steps, "decode_steps": self.decode_steps,
                "prefill_forwards": self.prefill_forwards, "rows_moved": self.rows_moved}
