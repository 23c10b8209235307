"""Inference engines behind `handler.engine.api.Engine`.

`make_engine("multilora" | "peft", model, EngineSettings(...), ...)` is the only thing the handler
needs. Nothing in this package knows about tenants, Redis or TorchServe.
Concurrency: an engine is owned by one thread.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .api import (Engine, GenerationOutput, GenerationRow, LoadedAdapter, RowEvent, RowStepper, SamplingParams,
                  StepLimits)
from .errors import (AdapterAlreadyLoaded, AdapterFormatError, AdapterNotLoaded, BatchShapeError, CacheFull,
                     EngineError, NoFreeSlot, RowTooLong, UnsupportedAdapter)
from .settings import EngineSettings

ENGINE_KINDS = ("multilora", "peft")


def make_engine(kind: str, model: nn.Module, settings: EngineSettings, *, eos_token_ids: Sequence[int],
                pad_token_id: int) -> Engine:
    """Build the engine named by the handler config (`engine: multilora` is the default there).

    `model` is a transformers causal LM already on its device/dtype; the
    multilora engine wraps its target linears in place, so give each engine its own model.
    `settings.decode` picks how the multilora engine decodes (see `multilora.engine`); the
    peft engine always uses `generate` and accepts only ``auto``/``generate``.
    """
    if kind == "multilora":
        from .multilora import MultiLoraEngine

        return MultiLoraEngine(model, settings, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
    if kind == "peft":
        if settings.decode not in ("auto", "generate"):
            raise ValueError(f"decode mode {settings.decode!r} needs engine 'multilora' (the peft engine uses generate)")
        from .peft_engine import PeftGroupedEngine

        return PeftGroupedEngine(model, settings, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
    raise ValueError(f"unknown engine kind {kind!r} (expected one of {', '.join(ENGINE_KINDS)})")


__all__ = ["make_engine", "ENGINE_KINDS", "EngineSettings", "Engine", "GenerationOutput", "GenerationRow", "LoadedAdapter",
           "SamplingParams", "EngineError", "AdapterFormatError", "UnsupportedAdapter", "NoFreeSlot",
           "AdapterAlreadyLoaded", "AdapterNotLoaded", "BatchShapeError", "StepLimits", "RowEvent", "RowStepper",
           "CacheFull", "RowTooLong"]
