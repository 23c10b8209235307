"""Attention for a mixed step: one forward of decode rows and prefill chunks together.

What a mixed step is (`stepping.Stepper`, ``StepLimits.mixed``): the model runs on ``[B + n*S, 1]``
tokens, every token its own batch row. The first B are a decode step over KV rows ``[0, B)``; the
rest are n prompt chunks of S tokens. Every layer but attention works token by token, so each
token can carry its own position and its own LoRA slot, and the chunks ride on the decode step's
weight reads and kernel launches instead of paying for a forward of their own. Attention is the
one layer that needs to know which tokens belong together: `mixed_attention` runs the model's own
attention function twice, once for the decode rows (each over its KV row, as a decode step does)
and once for the chunks (``[n, S]`` queries over their rows' keys, as a prefill forward does), and
hands back one ``[B + n*S, 1, heads, dim]`` output.

How it is wired: `transformers` picks a layer's attention function by the name in
``config._attn_implementation`` and passes the model call's extra keyword arguments through to
it. `mixed_forward` registers `mixed_attention` under `NAME`, switches the config to it for one
call, and passes the step's `MixedLayout` as ``row_layout``; `row_cache.RowCache.for_mixed` makes
the cache write both parts and hand the whole key/value store to the attention. Outside that call
the model is untouched.

Concurrency: the config switch is per call on the model's owning thread (the scheduler's); a
captured graph's replays run none of this Python.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "loraplex_mixed"


@dataclass(frozen=True)
class MixedLayout:
    """Where a mixed forward's tokens are and what each part may see."""

    batch: int  # B decode rows: tokens [0, B), KV rows [0, B)
    rows: int  # n chunks: tokens [B + i*S, B + (i+1)*S)
    tokens: int  # S tokens per chunk
    length: int  # keys [0, length) of every row
    chunk_rows: torch.Tensor  # [n] the chunks' KV rows
    decode_mask: torch.Tensor | None  # [B, 1, 1, length] (None when B = 0), in the inner function's format
    chunk_mask: torch.Tensor  # [n, 1, S, length]
    inner: Callable[..., tuple[torch.Tensor, Any]]  # the model's own attention function


def mixed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, *, row_layout: MixedLayout, **kwargs: Any
                    ) -> tuple[torch.Tensor, None]:
    """`query` ``[B + n*S, heads, 1, dim]``; `key`/`value` the whole KV store of this layer
    ``[rows, kv_heads, max_len, dim]`` (the mask the model passes is ignored: each part has its own)."""
    lay = row_layout
    B, n, S, L = lay.batch, lay.rows, lay.tokens, lay.length
    kwargs.pop("position_ids", None)  # per token; the inner functions take their masks instead
    heads, dim = query.shape[1], query.shape[-1]
    outs = []
    if B:
        out, _ = lay.inner(module, query[:B], key[:B, :, :L], value[:B, :, :L], lay.decode_mask, **kwargs)
        outs.append(out)  # [B, 1, heads, dim]
    q = query[B:, :, 0].view(n, S, heads, dim).transpose(1, 2)  # [n, heads, S, dim]
    k = key[:, :, :L].index_select(0, lay.chunk_rows)
    v = value[:, :, :L].index_select(0, lay.chunk_rows)
    out, _ = lay.inner(module, q, k, v, lay.chunk_mask, **kwargs)  # [n, S, heads, dim]
    outs.append(out.reshape(n * S, 1, heads, dim))
    return (torch.cat(outs) if len(outs) > 1 else outs[0]), None


AttentionInterface.register(NAME, mixed_attention)


def inner_attention(model: nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention function the model's layers use now (sdpa, or the modeling file's eager one)."""
    name = model.config._attn_implementation
    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    attn = next(m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj"))
    return getattr(sys.modules[type(attn).__module__], "eager_attention_forward")


@contextlib.contextmanager
def mixed_forward(model: nn.Module) -> Iterator[None]:
    """The model's layers call `mixed_attention` inside (the call must pass ``row_layout``)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
