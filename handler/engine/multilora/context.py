"""The per-batch state every LoRA layer reads: one slot index per row.

Why a shared object instead of a forward kwarg: transformers' `generate`
calls the model many times with its own arguments; threading a per-row tensor
through every module signature is impossible without patching the model. The
facade sets the context in a try/finally around one forward or one `generate`
call, and the layers read it.

The context also caches each layer's per-batch plan (see `ops.prepare_mixed`):
slots do not change during a `generate` call, so the per-row gather happens
once per call, not once per decode step. Clearing the context drops the cache,
so gathered weights never outlive the call that needed them.

Owned by one thread, like the engine.
"""
from __future__ import annotations

from typing import Any

import torch


class BatchContext:
    """Slots for the batch in flight (None = no batch: every layer runs base only)."""

    __slots__ = ("slots", "unique", "plans", "version", "kernel_rank")

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None
        self.unique: tuple[int, ...] = ()
        self.plans: dict[Any, Any] = {}
        self.version = 0
        # Set for a static batch (CUDA-graph decode): every layer runs the Triton kernel at
        # this rank and reads `slots` at run time, whatever adapters the slots name now.
        self.kernel_rank: int | None = None

    def set(self, slots: torch.Tensor, unique: tuple[int, ...], kernel_rank: int | None = None) -> None:
        self.slots = slots
        self.unique = unique
        self.kernel_rank = kernel_rank
        self.plans = {}
        self.version += 1

    def invalidate(self) -> None:
        """Slot contents changed (load/delete): rebuild plans on next forward."""
        self.plans = {}
        self.version += 1

    def clear(self) -> None:
        self.slots = None
        self.unique = ()
        self.kernel_rank = None
        self.plans = {}
        self.version += 1
