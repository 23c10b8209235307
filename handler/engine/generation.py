"""Shared `Engine.generate`: group rows, left-pad, one `generate` call per group,
strip prompts, stop at the first EOS.

Why shared: both engines must give a row the same answer for the same
prompt/adapter/params; only *how* a group's forward handles mixed adapters
differs (PEFT's `adapter_names=` sub-batches vs the slot pool). Each engine
passes a `GenerateFn` that runs one padded group.

Grouping rules (documented contract):

* Greedy rows (``do_sample=False``) form one group whatever their adapters or
  ``max_new_tokens``; the group runs to the largest ``max_new_tokens`` and each
  row is cut at its own (greedy decoding is prefix-stable, so this is exact).
  A greedy row's output does not depend on its batch-mates: left padding plus
  the attention mask (and position ids derived from it) make padding invisible.
* Sampled rows without a seed share a group per (temperature, top_p).
* A sampled row with a ``seed`` runs alone under ``torch.manual_seed(seed)``
  inside `torch.random.fork_rng`, so the same seed, prompt and adapter give the
  same tokens whatever else is in the request batch, and the caller's global RNG
  is left untouched.

Every decoding knob is passed explicitly: a model's `generation_config` may
carry sampling defaults (top_k, repetition_penalty...) that transformers would
otherwise merge in.

Returned ``token_ids`` exclude the EOS token; ``finish_reason`` is "stop" when an
EOS was produced within the row's ``max_new_tokens``, else "length".

Log-probabilities (``SamplingParams.logprobs``) do not change the grouping: a row that
asks shares its group (one forward per step) with rows that do not. Only a group with at
least one asking row computes them (`GenerateFn`'s ``logprobs`` = the largest k in the
group; 0 = none, and the decode paths then do exactly what they did without the feature);
each asking row gets its own k, cut with its tokens at its limit and EOS, and the rows that
did not ask get None. Computing them reads logits and draws no random numbers, so no row's
tokens change (`logprobs` module: which distribution, and how).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import logprobs as lp
from .api import MAX_LOGPROBS, GenerationOutput, GenerationRow, SamplingParams
from .errors import EngineError


@dataclass(frozen=True)
class GroupOutput:
    """One group's decode: ``model.generate``'s sequences [N, L + new], and the steps'
    log-probabilities when the call asked for them (else None)."""

    sequences: torch.Tensor
    logprobs: lp.StepLogprobs | None = None


# (input_ids[N, L], attention_mask[N, L], adapter per row, generate kwargs, logprobs k (0 = none)) -> GroupOutput
GenerateFn = Callable[[torch.Tensor, torch.Tensor, list, dict, int], GroupOutput]


def hf_generate(generate: Callable[..., Any], input_ids: torch.Tensor, k: int, **kw: Any) -> GroupOutput:
    """A transformers ``generate`` call; only with ``k >= 1`` does it keep each step's raw
    logits (``output_logits``), turned into log-probabilities of the new tokens."""
    if not k:
        return GroupOutput(generate(input_ids=input_ids, **kw))
    out = generate(input_ids=input_ids, output_logits=True, return_dict_in_generate=True, **kw)
    new = out.sequences[:, input_ids.shape[1]:]
    return GroupOutput(out.sequences, lp.from_step_logits(out.logits, new, k))


def group_rows(rows: Sequence[GenerationRow]) -> list[list[int]]:
    """Row indices per `generate` call, in first-appearance order."""
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        p = row.params
        if not p.do_sample:
            key: Any = ("greedy",)
        elif p.seed is not None:
            key = ("seeded", i)
        else:
            key = ("sample", float(p.temperature), float(p.top_p))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def left_pad(seqs: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (decoder-only models generate from the right edge)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def generation_kwargs(params: SamplingParams, max_new_tokens: int, eos_token_ids: Sequence[int],
                      pad_token_id: int) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1, num_return_sequences=1,
        do_sample=bool(params.do_sample), repetition_penalty=1.0, no_repeat_ngram_size=0,
        eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id, use_cache=True,
    )
    if params.do_sample:
        if params.temperature <= 0:
            raise EngineError(f"temperature must be > 0 when sampling (got {params.temperature})")
        kw.update(temperature=float(params.temperature), top_p=float(params.top_p), top_k=0)
    return kw


def finish(new_tokens: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int],
           logprobs: tuple[lp.RowLogprobs, int, int] | None = None) -> GenerationOutput:
    """Cut a row's new tokens at its own limit and at the first EOS; ``logprobs`` =
    (the group's, this row's index in it, its k), cut with the tokens."""
    toks = list(new_tokens[:max_new_tokens])
    eos = set(eos_token_ids)
    reason = "length"
    for j, t in enumerate(toks):
        if t in eos:
            toks, reason = toks[:j], "stop"
            break
    if logprobs is None:
        return GenerationOutput(token_ids=toks, finish_reason=reason)
    group, j, k = logprobs
    chosen, top = group.row(j, len(toks), k)
    return GenerationOutput(token_ids=toks, finish_reason=reason, token_logprobs=chosen, top_logprobs=top)


def validate_rows(rows: Sequence[GenerationRow]) -> None:
    for i, row in enumerate(rows):
        if len(row.input_ids) == 0:
            raise EngineError(f"row {i}: empty prompt")
        if row.params.max_new_tokens < 1:
            raise EngineError(f"row {i}: max_new_tokens must be >= 1")
        k = row.params.logprobs
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS:
            raise EngineError(f"row {i}: logprobs must be an integer from 0 to {MAX_LOGPROBS} (got {k!r})")


def run_rows(rows: Sequence[GenerationRow], generate_fn: GenerateFn, *, eos_token_ids: Sequence[int],
             pad_token_id: int, device: torch.device | str) -> list[GenerationOutput]:
    """Serve every row; see the module docstring for grouping and determinism."""
    validate_rows(rows)
    outputs: list[GenerationOutput | None] = [None] * len(rows)
    for idx in group_rows(rows):
        group = [rows[i] for i in idx]
        ids, mask = left_pad([r.input_ids for r in group], pad_token_id, device)
        max_new = max(r.params.max_new_tokens for r in group)
        kw = generation_kwargs(group[0].params, max_new, eos_token_ids, pad_token_id)
        adapters = [r.adapter for r in group]
        k = max(r.params.logprobs for r in group)
        seed = group[0].params.seed if group[0].params.do_sample else None
        if seed is not None:
            dev = torch.device(device)
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(seed)
                out = generate_fn(ids, mask, adapters, kw, k)
        else:
            out = generate_fn(ids, mask, adapters, kw, k)
        new = out.sequences[:, ids.shape[1]:].tolist()
        host = out.logprobs.rows() if k else None
        for j, i in enumerate(idx):
            row_k = rows[i].params.logprobs
            outputs[i] = finish(new[j], rows[i].params.max_new_tokens, eos_token_ids,
                                (host, j, row_k) if row_k else None)
    return outputs  # type: ignore[return-value]
