"""Prompt embeddings from the base model itself: the mean of its last hidden state over a prompt's tokens.

Why the base model's own states: the task router (handler/task_router.py) needs a sentence embedding
and the worker already holds a language model; a separate embedding model would be more memory and
one more thing to ship. Mean pooling (not the last token) because a causal model's last position
mostly encodes "what comes next", while the mean over every position keeps what the prompt is about.

`mean_pooled` runs the plain transformers causal LM it is given, so its caller guarantees that no
adapter is active: the multilora engine passes its wrapped model, whose layers run the base weights
whenever no batch context is set (the state between steps and calls); the peft engine wraps the call
in PEFT's `disable_adapter()`.

Concurrency: runs on the thread that owns the engine (callers: the engines' `embed`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

CHUNK_ROWS = 16  # prompts per forward: bounds the padded batch's memory


def mean_pooled(model: nn.Module, batch: Sequence[Sequence[int]], *, pad_token_id: int,
                base_only: Callable[[], ContextManager[None]] | None = None) -> torch.Tensor:
    """[len(batch), hidden] float32 on the CPU: each prompt's last-layer hidden states (after the
    model's final norm) averaged over its own tokens. Rows are right-padded, so padding never
    changes a real token's state under causal attention, and excluded from the mean by the mask."""
    if not batch or any(len(ids) == 0 for ids in batch):
        raise ValueError("embed needs at least one prompt and no empty prompt")
    device = next(model.parameters()).device
    backbone = getattr(model, "base_model", model)  # transformers' decoder without the LM head (no logits)
    out: list[torch.Tensor] = []
    with torch.inference_mode(), (base_only or contextlib.nullcontext)():
        for start in range(0, len(batch), CHUNK_ROWS):
            rows = [list(map(int, ids)) for ids in batch[start:start + CHUNK_ROWS]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, :len(r)] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
    return torch.cat(out)
