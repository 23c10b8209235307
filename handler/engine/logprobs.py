"""Per-token log-probabilities of a decoded group: the one place that says how they are taken.

What: for each generated step of each row, the chosen token's log-probability and the
top-k (token id, log-probability) pairs, from the model's own next-token distribution:
log_softmax of the step's raw logits in fp32, before temperature and top-p
(`api.SamplingParams` says why). Every decode path uses these functions:
`from_step_logits` on transformers' ``output_logits`` (``generate``, the peft engine) and
`Recorder` inside the static decoder's loop (``static``, and ``graphs`` on the replayed
graph's logits output, outside the graph). Nothing here runs unless a row asked
(``k >= 1``). Cost when asked: ``generate`` keeps each step's raw fp32 [N, V] logits
until the call returns (transformers' ``output_logits``); the static loop keeps only
[N, steps, k] per call.

Concurrency: plain functions and one per-call object; no shared state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class StepLogprobs:
    """A group's log-probabilities, rows x generated steps (steps past a row's end are filler)."""

    chosen: torch.Tensor  # [N, S] fp32: log-probability of the token the row got at that step
    top_ids: torch.Tensor  # [N, S, k] long, most likely first
    top_values: torch.Tensor  # [N, S, k] fp32

    def rows(self) -> "RowLogprobs":
        """Host copies (one transfer per tensor), to cut per row."""
        return RowLogprobs(self.chosen.tolist(), self.top_ids.tolist(), self.top_values.tolist())


@dataclass(frozen=True)
class RowLogprobs:
    chosen: list[list[float]]
    top_ids: list[list[list[int]]]
    top_values: list[list[list[float]]]

    def row(self, j: int, n_tokens: int, k: int) -> tuple[list[float], list[tuple[tuple[int, float], ...]]]:
        """Row j's first `n_tokens` steps, its own top-k (a prefix of the group's: sorted)."""
        top = [tuple(zip(ids[:k], vals[:k])) for ids, vals in zip(self.top_ids[j][:n_tokens],
                                                                   self.top_values[j][:n_tokens])]
        return self.chosen[j][:n_tokens], top


def step(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step: ``logits`` [N, V] raw, ``chosen`` [N] -> (chosen logprob [N], top ids [N, k], top logprobs [N, k])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return lp.gather(-1, chosen.view(-1, 1)).squeeze(-1), top.indices, top.values


def from_step_logits(logits: Sequence[torch.Tensor], new_tokens: torch.Tensor, k: int) -> StepLogprobs:
    """From transformers' ``output_logits`` (one raw [N, V] per step) and the new tokens [N, S]."""
    parts = [step(lg, new_tokens[:, s].to(lg.device), k) for s, lg in enumerate(logits)]
    return StepLogprobs(torch.stack([p[0] for p in parts], 1), torch.stack([p[1] for p in parts], 1),
                        torch.stack([p[2] for p in parts], 1))


class Recorder:
    """Preallocated per-step outputs for a decode loop of at most `max_steps` steps over `batch` rows."""

    def __init__(self, batch: int, max_steps: int, k: int, vocab: int, device: torch.device) -> None:
        self.k = min(k, vocab)
        self.chosen = torch.zeros(batch, max_steps, dtype=torch.float32, device=device)
        self.top_ids = torch.zeros(batch, max_steps, self.k, dtype=torch.long, device=device)
        self.top_values = torch.zeros(batch, max_steps, self.k, dtype=torch.float32, device=device)

    def record(self, s: int, logits: torch.Tensor, chosen: torch.Tensor) -> None:
        c, i, v = step(logits, chosen, self.k)
        self.chosen[:, s] = c
        self.top_ids[:, s] = i
        self.top_values[:, s] = v

    def result(self, rows: int, steps: int) -> StepLogprobs:
        return StepLogprobs(self.chosen[:rows, :steps], self.top_ids[:rows, :steps], self.top_values[:rows, :steps])
