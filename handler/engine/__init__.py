"""Inference engines behind `handler.engine.api.Engine`.

`make_engine("multilora" | "peft", model, ...)` is the only thing the handler
needs. Nothing in this package knows about tenants, Redis or TorchServe.
Concurrency: an engine is owned by one thread.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .api import Engine, GenerationOutput, GenerationRow, LoadedAdapter, SamplingParams
from .errors import (AdapterAlreadyLoaded, AdapterFormatError, AdapterNotLoaded, BatchShapeError, EngineError,
                     NoFreeSlot, UnsupportedAdapter)

ENGINE_KINDS = ("multilora", "peft")


def make_engine(kind: str, model: nn.Module, *, eos_token_ids: Sequence[int], pad_token_id: int,
                max_adapters: int, max_rank: int, target_modules: Sequence[str] | None = None,
                decode: str = "auto", decode_graph_buckets: int = 8, cpu_gather_workspace_mb: int = 512) -> Engine:
    """Build the engine named by the handler config (`engine: multilora` is the default there).

    `model` is a transformers causal LM already on its device/dtype; the
    multilora engine wraps its target linears in place, so give each engine its own model.
    `decode` picks how the multilora engine decodes (see `multilora.engine`); the
    peft engine always uses `generate` and accepts only ``auto``/``generate``.
    """
    if kind == "multilora":
        from .multilora import MultiLoraEngine

        return MultiLoraEngine(model, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                               max_adapters=max_adapters, max_rank=max_rank, target_modules=target_modules,
                               decode=decode, max_graphs=decode_graph_buckets,
                               cpu_gather_workspace_bytes=cpu_gather_workspace_mb << 20)
    if kind == "peft":
        if decode not in ("auto", "generate"):
            raise ValueError(f"decode mode {decode!r} needs engine 'multilora' (the peft engine uses generate)")
        from .peft_engine import PeftGroupedEngine

        return PeftGroupedEngine(model, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                                 max_adapters=max_adapters, max_rank=max_rank, target_modules=target_modules)
    raise ValueError(f"unknown engine kind {kind!r} (expected one of {', '.join(ENGINE_KINDS)})")


__all__ = ["make_engine", "ENGINE_KINDS", "Engine", "GenerationOutput", "GenerationRow", "LoadedAdapter",
           "SamplingParams", "EngineError", "AdapterFormatError", "UnsupportedAdapter", "NoFreeSlot",
           "AdapterAlreadyLoaded", "AdapterNotLoaded", "BatchShapeError"]
