"""The per-batch state every LoRA layer reads: one slot index per row.

Why a shared object instead of a forward kwarg: transformers' `generate`
calls the model many times with its own arguments; threading a per-row tensor
through every module signature is impossible without patching the model. The
facade sets the context in a try/finally around one forward or one `generate`
call, and the layers read it.

The context also caches each layer's per-batch plan (see `ops.prepare_mixed`):
slots do not change during a `generate` call, so the per-row gather happens
once per call, not once per decode step. Clearing the context drops the cache,
so gathered weights never outlive the call that needed them; the memory they
were gathered into stays in the context's `GatherWorkspace` for the next call.

Owned by one thread, like the engine.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .backend import LoraBackend


class GatherWorkspace:
    """Memory that the per-call gathers of each row's adapter (`ops.prepare_mixed`) reuse
    from one call to the next.

    Why: a mixed batch on the torch path gathers every row's A and B for every layer, batch x
    adapter bytes per call (156 MB for 8 rows of SmolLM2-135M at rank 16). Allocated fresh,
    that memory goes back to the OS whenever something else in the process frees memory in
    between, and the next mixed call then pays a page fault per 4 KiB touched (CPU bench:
    6,000+ faults and a prefill a few percent slower; bench/RESULTS.md). Held here, the pages
    are faulted in once.

    Bump allocation within a call (`take`); `rewind` (at the start and end of every call)
    grows the buffer to what the last call asked for, up to `limit_bytes` — beyond the limit,
    and before the first rewind, `take` hands out fresh tensors as before. `release` frees it.
    A limit of 0 turns it off (a CUDA pool: the caching allocator already reuses memory).
    Owned by the engine's thread, like the context.
    """

    ALIGN = 64  # elements: every view starts 64-element aligned, as a fresh allocation would

    def __init__(self, dtype: torch.dtype, device: torch.device, limit_bytes: int) -> None:
        self.dtype = dtype
        self.device = device
        self._el = torch.empty((), dtype=dtype).element_size()
        self.limit = max(0, int(limit_bytes)) // self._el  # in elements
        self._buf: torch.Tensor | None = None
        self._used = 0
        self._need = 0

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel() * self._el

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape`, valid until the next `rewind`."""
        n = math.prod(shape)
        span = -(-n // self.ALIGN) * self.ALIGN
        self._need += span
        buf = self._buf
        if buf is not None and self._used + n <= buf.numel():
            view = buf[self._used:self._used + n].view(shape)
            self._used += span
            return view
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def rewind(self) -> None:
        """Forget every view handed out (callers have dropped them) and size the buffer for
        a call like the last one."""
        need = min(self._need, self.limit)
        if need > (0 if self._buf is None else self._buf.numel()):
            self._buf = None  # the old buffer goes first, so the two never coexist
            # a normal tensor even when the call runs under inference_mode, so that later calls
            # without it may still write into it
            with torch.inference_mode(False):
                self._buf = torch.empty(need, dtype=self.dtype, device=self.device)
        self._used = self._need = 0

    def release(self) -> None:
        self._buf = None
        self._used = self._need = 0


class BatchContext:
    """Slots for the batch in flight (None = no batch: every layer runs base only)."""

    __slots__ = ("slots", "unique", "plans", "version", "kernel_rank", "workspace", "backend")

    def __init__(self, workspace: GatherWorkspace | None = None, backend: LoraBackend | None = None) -> None:
        self.slots: torch.Tensor | None = None
        self.unique: tuple[int, ...] = ()
        self.plans: dict[Any, Any] = {}
        self.version = 0
        self.workspace = workspace  # where plans gather into; None: fresh tensors
        # which LoRA path every layer takes: fixed when the engine is built (`backend`), not per batch
        self.backend = backend if backend is not None else LoraBackend()
        # Set for a static batch (CUDA-graph decode): every layer runs the Triton kernel at
        # this rank and reads `slots` at run time, whatever adapters the slots name now.
        self.kernel_rank: int | None = None

    def set(self, slots: torch.Tensor, unique: tuple[int, ...], kernel_rank: int | None = None) -> None:
        self.slots = slots
        self.unique = unique
        self.kernel_rank = kernel_rank
        self.plans = {}
        self.version += 1
        if self.workspace is not None:
            self.workspace.rewind()

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
        if self.workspace is not None:  # the plans holding its views are gone
            self.workspace.rewind()
