"""Read and check a PEFT LoRA adapter for an engine, without building any module.

Why separate from the pool: everything that can make a load fail is checked here *before* a
slot is touched, so a refused adapter leaves no trace. The rules are not the engine's own: they
are `loraplex_common.adapter_format.check_adapter`, the same function onboarding validates with,
so the engines refuse exactly what onboarding refuses, with the same message (re-raised here as
`UnsupportedAdapter` or `AdapterFormatError`, the refusal chained as the cause).

A source is an `AdapterBytes` (what the worker's store read and hashed: the engine loads those
very bytes) or a directory (tests, tools), which is read once into one. Never `torch.load`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

from torch import nn

from loraplex_common.adapter_format import (AdapterBytes, AdapterRefused, Into, LinearLayers, ParsedAdapter,
                                            check_adapter)

from ..errors import AdapterFormatError, UnsupportedAdapter

AdapterSource = Union[str, os.PathLike, AdapterBytes]

__all__ = ["AdapterSource", "ParsedAdapter", "adapter_bytes", "linear_layers", "read_adapter"]


def adapter_bytes(source: AdapterSource, into: Into | None = None) -> AdapterBytes:
    """`source` itself, or the two files of the directory `source`, read once (the weights into
    `into` when given)."""
    if isinstance(source, AdapterBytes):
        return source
    try:
        return AdapterBytes.read_dir(source, into)
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{source}: no {Path(exc.filename or '?').name}") from None
    except OSError as exc:
        raise AdapterFormatError(f"{source}: unreadable adapter ({exc})") from None


def linear_layers(model: nn.Module, targets: Sequence[str]) -> LinearLayers:
    """The model's linear layers, those whose leaf name is in `targets` adaptable. A wrapped target
    (the slot pool's `MultiLoraLinear`) keeps its linear as `base_layer` and counts under its own name."""
    linears = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            name = name.removesuffix(".base_layer")
            linears[name] = (module.in_features, module.out_features)
    return LinearLayers.of(linears, tuple(targets))


def read_adapter(source: AdapterSource, layers: LinearLayers, max_rank: int,
                 into: Into | None = None) -> ParsedAdapter:
    """Check the adapter against the engine's layers and maximum rank; raise the engine's error types.
    A directory's weights file is read into `into` when given."""
    adapter = adapter_bytes(source, into)
    try:
        return check_adapter(adapter, layers, max_rank)
    except AdapterRefused as refusal:
        cls = UnsupportedAdapter if refusal.unsupported else AdapterFormatError
        raise cls(f"{adapter.name}: {refusal}") from refusal
