"""Decoding over a static KV cache, each decode step replayed from a captured CUDA graph.

Why: on a GPU an eager decode step of a small model is bound by kernel
launches, and the LoRA deltas add two per target linear (14 per Llama layer).
A captured graph replays a whole step with one launch, so the LoRA kernels cost
only their GPU time (figures: bench/RESULTS.md).
transformers' own static-cache auto-compile skipped CUDA graphs ("mutated
inputs") when tried, so the engine captures the step itself.

A call (`StaticDecoder.generate`) has `model.generate`'s meaning for the knobs
`generation.generation_kwargs` sets (greedy, or temperature/top-p sampling with
transformers' own warpers, EOS, pad), and the same output shape:

1. Rows are padded to a batch bucket (1, 2, 4, ...) with one-token base rows,
   and the cache length (prompt + new tokens) is rounded up to `len_bucket`,
   so a handful of graphs serve every request shape.
2. The prompt is prefilled eagerly (left-padded, 4D mask, position ids as
   `generate` derives them) into the bucket's `StaticCache`.
3. Each decode step replays the graph: a forward on ``[B, 1]`` that writes the
   cache at the device-side position and advances positions and mask for the
   next step, all in place. The next token is picked eagerly from the graph's
   static logits (three small launches). Every `check_every` steps one host
   sync asks whether every row has produced EOS.
4. Only when the call asks for log-probabilities (`decode`'s ``logprobs`` >= 1)
   each step's logits (the prefill's, then the graph's static output after its
   replay) also go through `..logprobs.Recorder`, eagerly: the captured graph
   is the same with or without them.

Per key (batch bucket, cache bucket, LoRA rank bucket) a `_Bucket` keeps the
cache, the static inputs and the graph; at most `decode_graph_buckets` are kept
(least recently used dropped first: its cache and graph memory go back to the
allocator). LoRA slots of a bucket are one fixed device tensor that the
captured kernels read at replay: the engine copies the batch's slots into it,
so a graph captured for one set of adapters serves any other. Loading or
deleting adapters writes the pool in place, so graphs stay valid.

Without CUDA (or with ``use_graphs=False``) the same loop runs eagerly step by
step; that is how CPU tests check the loop against `generate`.

Concurrency: owned by the engine's thread, like the model.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch
from torch import nn

from .errors import EngineError
from .generation import GroupOutput
from .logprobs import Recorder


class LoraRows(Protocol):
    """What the decoder needs from a LoRA wrapper (`multilora.MultiLoraModel` has it)."""

    def resolve_slots(self, adapter_names: Sequence[Any], batch_size: int) -> list[int]: ...

    def batch(self, adapter_names: Sequence[Any], batch_size: int) -> ContextManager[None]:
        """Eager forwards for these rows (any code path)."""
        ...

    def static_batch(self, slots: torch.Tensor, rank: int) -> ContextManager[None]:
        """Forwards that read the rows' slots from `slots` at run time, through kernels
        that serve every rank up to `rank`: what a captured graph can replay for any adapters."""
        ...

    def decode_rank(self, slots: Sequence[int]) -> int | None:
        """Rank bucket for these slots: 0 = no adapter rows, None = not capturable."""
        ...

    def warm_prefill_kernels(self) -> int:
        """Compile every launch variant an eager prefill's LoRA kernels can take (0 where none run)."""
        ...


SUPPORTED_ATTENTION = ("sdpa", "eager")


def _bucket(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def round_up(n: int, to: int) -> int:
    return -(-int(n) // to) * to


@dataclass
class _Bucket:
    """Everything a captured step reads or writes, at fixed addresses."""

    batch: int
    length: int
    rank: int
    cache: Any
    ids: torch.Tensor  # [B, 1] next input token
    pos: torch.Tensor  # [B, 1] its position id
    cur: torch.Tensor  # [] cache index the next step writes
    keep: torch.Tensor  # [B, T] bool: key not a prompt pad
    visible: torch.Tensor  # [T] bool scratch
    cond: torch.Tensor  # [B, T] bool scratch
    mask: torch.Tensor  # [B, 1, 1, T] bool (sdpa) or additive float (eager attention)
    arange: torch.Tensor  # [T]
    slots: torch.Tensor | None  # [B] LoRA slot per row (None: no LoRA in this bucket)
    graph: Any = None
    logits: torch.Tensor | None = None  # the captured step's output
    replays: int = 0


class StaticDecoder:
    """Static-cache decoding for one causal LM, with CUDA-graph replay of decode steps on the GPU.

    `lora` sets the rows' adapters (None: a model without LoRA layers, the bench's
    base). Eagerly (prefill, and every step without graphs) it is an ordinary
    batch; a captured step reads the slots from the bucket's static tensor. A
    batch whose ranks the kernels cannot serve raises `NotCapturable` when graphs
    are on; the engine then falls back to `model.generate`.
    """

    def __init__(self, model: nn.Module, *, use_graphs: bool, lora: LoraRows | None = None,
                 decode_graph_buckets: int = 8, len_bucket: int = 256, check_every: int = 8) -> None:
        attn = getattr(model.config, "_attn_implementation", None) or "eager"
        if attn not in SUPPORTED_ATTENTION:
            raise EngineError(f"static decoding supports attention {SUPPORTED_ATTENTION}, model uses {attn!r}")
        self.model = model
        self.use_graphs = bool(use_graphs)
        self.lora = lora
        self.decode_graph_buckets = max(1, int(decode_graph_buckets))
        self.len_bucket = max(1, int(len_bucket))
        self.check_every = max(1, int(check_every))
        self.float_mask = attn == "eager"
        self._buckets: "OrderedDict[tuple[int, int, int], _Bucket]" = OrderedDict()
        self._pool = None  # one CUDA-graph memory pool shared by all buckets (replays never overlap)
        self.captures = 0

    # -- public -------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter_names: Sequence[Any],
                 **kw: Any) -> torch.Tensor:
        """``model.generate``'s return: ``[N, L + new]`` (rows that stopped early are padded)."""
        return self.decode(input_ids, attention_mask, adapter_names, **kw).sequences

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter_names: Sequence[Any], *,
               logprobs: int = 0, **kw: Any) -> GroupOutput:
        """`generate`'s sequences and, with ``logprobs`` = k >= 1, every step's log-probabilities
        (`..logprobs`: the chosen token's and the top k, from the step's raw logits)."""
        N, L = input_ids.shape
        max_new = int(kw["max_new_tokens"])
        eos = torch.as_tensor(list(kw.get("eos_token_id") or []), dtype=torch.long, device=input_ids.device)
        pad_id = int(kw.get("pad_token_id") or 0)
        B = _bucket(N)
        names = list(adapter_names) if adapter_names is not None else [None] * N
        names += [None] * (B - N)
        slots = self.lora.resolve_slots(names, B) if self.lora is not None else [0] * B
        graphs = self.use_graphs and input_ids.is_cuda
        rank = self.lora.decode_rank(slots) if self.lora is not None else 0
        if rank is None:
            if graphs:
                raise NotCapturable("adapter ranks exceed what the captured LoRA kernels serve")
            rank = 0
        T = round_up(L + max_new, self.len_bucket)
        st = self._bucket_for(B, T, rank if graphs else 0, input_ids.device)
        ids, pm = _pad_rows(input_ids, attention_mask, B, pad_id)
        pick = picker(kw)

        # -- prefill (eager) --------------------------------------------------
        _reset_cache(st.cache)
        st.keep.fill_(True)
        st.keep[:, :L] = pm.bool()
        positions = pm.long().cumsum(-1) - 1
        positions.masked_fill_(pm == 0, 1)
        with contextlib.ExitStack() as batch:
            # The rows' eager LoRA batch (slots resolved, per-layer plans built once) serves the
            # prefill and, without graphs, every decode step; captured steps set their own.
            if self.lora is not None:
                batch.enter_context(self.lora.batch(names, B))
            out = self.model(input_ids=ids, attention_mask=self._prefill_mask(st, L), position_ids=positions,
                             past_key_values=st.cache, use_cache=True, logits_to_keep=1)
            if graphs:
                batch.close()
            tokens = torch.full((B, max_new), pad_id, dtype=torch.long, device=ids.device)
            done = torch.zeros(B, dtype=torch.bool, device=ids.device)
            done[N:] = True
            logits = out.logits[:, -1]
            nxt = pick(logits)
            rec = Recorder(N, max_new, logprobs, logits.shape[-1], ids.device) if logprobs else None  # no filler rows
            if rec is not None:
                rec.record(0, logits[:N], nxt[:N])
            del out, logits
            tokens[:, 0] = nxt
            done |= torch.isin(nxt, eos)
            st.ids.copy_(nxt.view(B, 1))
            st.pos.copy_(pm.long().sum(-1, keepdim=True))
            st.cur.fill_(L)
            self._write_mask(st)

            # -- decode -----------------------------------------------------------
            steps = 1
            if max_new > 1:
                step = self._stepper(st, slots, graphs)
                while steps < max_new:
                    if steps % self.check_every == 0 and bool(done.all()):
                        break
                    logits = step()
                    nxt = torch.where(done, pad_id, pick(logits))
                    if rec is not None:
                        rec.record(steps, logits[:N], nxt[:N])
                    tokens[:, steps] = nxt
                    done |= torch.isin(nxt, eos)
                    st.ids.copy_(nxt.view(B, 1))
                    steps += 1
        seqs = torch.cat([input_ids, tokens[:N, :steps]], dim=1)
        return GroupOutput(seqs, rec.result(N, steps) if rec is not None else None)

    def describe(self) -> dict[str, Any]:
        return {"graphs": self.use_graphs, "captures": self.captures,
                "buckets": [{"batch": b.batch, "cache_len": b.length, "rank": b.rank, "replays": b.replays,
                             "captured": b.graph is not None} for b in self._buckets.values()]}

    # -- buckets -----------------------------------------------------------
    def _bucket_for(self, B: int, T: int, rank: int, device: torch.device) -> _Bucket:
        key = (B, T, rank)
        st = self._buckets.get(key)
        if st is not None:
            self._buckets.move_to_end(key)
            return st
        while len(self._buckets) >= self.decode_graph_buckets:
            self._buckets.popitem(last=False)
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=T)
        mask_dtype = self.model.dtype if self.float_mask else torch.bool
        st = _Bucket(
            batch=B, length=T, rank=rank, cache=cache,
            ids=torch.zeros(B, 1, dtype=torch.long, device=device),
            pos=torch.zeros(B, 1, dtype=torch.long, device=device),
            cur=torch.zeros((), dtype=torch.long, device=device),
            keep=torch.ones(B, T, dtype=torch.bool, device=device),
            visible=torch.zeros(T, dtype=torch.bool, device=device),
            cond=torch.zeros(B, T, dtype=torch.bool, device=device),
            mask=torch.zeros(B, 1, 1, T, dtype=mask_dtype, device=device),
            arange=torch.arange(T, device=device),
            slots=torch.zeros(B, dtype=torch.long, device=device) if rank else None)
        self._buckets[key] = st
        return st

    def _static(self, st: _Bucket) -> ContextManager[None]:
        if self.lora is None or st.slots is None:
            return contextlib.nullcontext()
        return self.lora.static_batch(st.slots, st.rank)

    # -- masks ------------------------------------------------------------------
    def _prefill_mask(self, st: _Bucket, L: int) -> torch.Tensor:
        """[B, 1, L, T]: causal, prompt pads hidden, and every query sees itself (a pad
        query row with no visible key would make NaN keys/values in the cache)."""
        q = st.arange[:L].view(L, 1)
        k = st.arange.view(1, st.length)
        m = ((k <= q).unsqueeze(0) & st.keep.unsqueeze(1)) | (k == q).unsqueeze(0)
        return self._as_mask(m.unsqueeze(1))

    def _as_mask(self, m: torch.Tensor) -> torch.Tensor:
        if not self.float_mask:
            return m
        return (~m).to(self.model.dtype) * torch.finfo(self.model.dtype).min

    def _write_mask(self, st: _Bucket) -> None:
        """The next step's [B, 1, 1, T] mask, in place: prompt keys minus pads, plus every generated key."""
        torch.le(st.arange, st.cur, out=st.visible)
        torch.logical_and(st.keep, st.visible, out=st.cond)
        cond = st.cond.view(st.batch, 1, 1, st.length)
        if self.float_mask:
            st.mask.copy_(self._as_mask(cond))
        else:
            st.mask.copy_(cond)

    # -- the decode step ------------------------------------------------------
    def _forward_step(self, st: _Bucket) -> torch.Tensor:
        out = self.model(input_ids=st.ids, attention_mask=st.mask, position_ids=st.pos, past_key_values=st.cache,
                         use_cache=True, logits_to_keep=1)
        st.pos.add_(1)
        st.cur.add_(1)
        self._write_mask(st)
        return out.logits[:, -1]

    def _stepper(self, st: _Bucket, slots: list[int], graphs: bool) -> Callable[[], torch.Tensor]:
        if not graphs:  # the caller's eager batch is still open
            return lambda: self._forward_step(st)
        if st.slots is not None:
            st.slots.copy_(torch.as_tensor(slots, dtype=torch.long))
        if st.graph is None:
            try:
                self._capture(st)
            except Exception as exc:  # e.g. out of memory while capturing: serve this batch eagerly
                self._buckets.pop((st.batch, st.length, st.rank), None)
                raise NotCapturable(f"CUDA graph capture failed: {type(exc).__name__}: {exc}"[:300]) from exc

        def replay() -> torch.Tensor:
            st.graph.replay()
            st.replays += 1
            return st.logits
        return replay

    def _capture(self, st: _Bucket) -> None:
        """Warm up (kernel JIT, cuBLAS workspaces) on a side stream, restore the step's
        inputs, then capture one step. The warm-up writes one cache position that the
        first real step overwrites; the capture itself runs nothing."""
        saved = [t.clone() for t in (st.ids, st.pos, st.cur, st.mask)]
        lengths = [lay.cumulative_length.clone() for lay in st.cache.layers]
        device = st.ids.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), self._static(st):
            self._forward_step(st)
        torch.cuda.current_stream(device).wait_stream(side)
        for t, s in zip((st.ids, st.pos, st.cur, st.mask), saved):
            t.copy_(s)
        for lay, n in zip(st.cache.layers, lengths):
            lay.cumulative_length.copy_(n)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with self._static(st), torch.cuda.graph(graph, pool=self._pool):
            st.logits = self._forward_step(st)
        st.graph = graph
        self.captures += 1


class NotCapturable(EngineError):
    """This batch cannot use the static decoder; the engine falls back to `model.generate`."""


def _reset_cache(cache: Any) -> None:
    """Rewind a StaticCache to empty (its tensors keep their addresses: graphs stay valid)."""
    for lay in cache.layers:
        length = getattr(lay, "cumulative_length", None)
        if isinstance(length, torch.Tensor):
            length.fill_(0)
        if hasattr(lay, "cumulative_length_int"):  # some transformers 5.x releases keep a host copy
            lay.cumulative_length_int = 0


def _pad_rows(ids: torch.Tensor, mask: torch.Tensor, B: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Add ``B - N`` filler rows: one real (pad) token each, run on the base model, output dropped."""
    N, L = ids.shape
    if B == N:
        return ids, mask
    fill_ids = torch.full((B - N, L), pad_id, dtype=ids.dtype, device=ids.device)
    fill_mask = torch.zeros((B - N, L), dtype=mask.dtype, device=mask.device)
    fill_mask[:, -1] = 1
    return torch.cat([ids, fill_ids]), torch.cat([mask, fill_mask])


def picker(kw: dict[str, Any], generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The next-token rule `generate` applies for these kwargs: argmax, or fp32 logits
    through transformers' temperature and top-p warpers, softmax, one multinomial draw
    (from `generator`, else the global RNG; `stepping` gives each sampled row its own)."""
    if not kw.get("do_sample"):
        return lambda logits: logits.argmax(-1)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(float(kw["temperature"]))]
    top_p = float(kw.get("top_p", 1.0))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.to(torch.float32)
        for w in warpers:
            scores = w(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)

    return sample
