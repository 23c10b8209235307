"""The per-batch state every LoRA layer reads: one slot index per row.

Why a shared object instead of a forward kwarg: transformers' `generate`
calls the model many times with its own arguments; threading a per-row tensor
through every module signature is impossible without patching the model. The
facade sets the context in a try/finally around one forward or one `generate`
call, and the layers read it.

The context also caches each layer's per-batch plan (`plans`; see `lora_ops.prepare_mixed`):
slots do not change during a `generate` call, so the per-row gather happens
once per call, not once per decode step. Clearing the context drops the cache,
so gathered weights never outlive the call that needed them; the memory they
were gathered into stays in the context's `GatherWorkspace` for the next call.

Owned by one thread, like the engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .backend import LoraBackend

if TYPE_CHECKING:
    from ..lora_ops import SlotGroups
    from .plans import LayerPlan


class GatherWorkspace:
    """Memory that the per-call gathers of each row's adapter (`lora_ops.prepare_mixed`) reuse
    from one call to the next.

    Why: a mixed batch on the torch path gathers every row's A and B for every layer, batch x
    adapter bytes per call. Allocated fresh, that memory goes back to the OS whenever something
    else in the process frees memory in between, and the next mixed call then pays a page fault
    per 4 KiB touched (bench/RESULTS.md). Held here, the pages are faulted in once.

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


@dataclass
class GroupOutputs:
    """A group's outputs for one input tensor, until every member has taken its own."""

    x: torch.Tensor  # the input they were computed for (held, so its identity is not reused meanwhile)
    outputs: list[torch.Tensor]  # one per member, in the group's order
    pending: int  # members that have not taken theirs yet


class BatchContext:
    """Slots for the batch in flight (None = no batch: every layer runs base only), and what the
    layers computed for it once (their plans, the groups' ranks and outputs).

    Per batch (reset by `set` / `clear`; plans also by `invalidate`):
      `slots` ``[N]`` long, one slot per row; `unique` the sorted distinct slots; `kernel_rank` set
      for a static batch (CUDA-graph decode: every layer runs the Triton kernel at this rank and
      reads `slots` at run time, whatever adapters the slots name now); `layer_plans` /
      `kernel_plans` each layer's `plans.LayerPlan` by layer index (eager / kernel forwards);
      `group_ranks` a group's rank for the batch and `group_outputs` its outputs for the current
      input, by group id; `slot_groups` the rows grouped by slot (`lora_ops.SlotGroups`, built by the
      first `plans.BySlotPlan` of the batch, shared by the others).
    Per engine: `workspace` (where plans gather into; None: fresh tensors) and `backend` (which LoRA
    path the layers take, fixed at build from `EngineSettings.lora_backend`).
    """

    __slots__ = ("slots", "unique", "kernel_rank", "layer_plans", "kernel_plans", "group_ranks", "group_outputs",
                 "slot_groups", "workspace", "backend")

    def __init__(self, workspace: GatherWorkspace | None = None, backend: LoraBackend | None = None) -> None:
        self.slots: torch.Tensor | None = None
        self.unique: tuple[int, ...] = ()
        self.kernel_rank: int | None = None
        self.layer_plans: dict[int, LayerPlan] = {}
        self.kernel_plans: dict[int, LayerPlan] = {}
        self.group_ranks: dict[int, int] = {}
        self.group_outputs: dict[int, GroupOutputs] = {}
        self.slot_groups: SlotGroups | None = None
        self.workspace = workspace
        self.backend = backend if backend is not None else LoraBackend()

    def set(self, slots: torch.Tensor, unique: tuple[int, ...], kernel_rank: int | None = None) -> None:
        self.slots = slots
        self.unique = unique
        self.kernel_rank = kernel_rank
        self._drop()
        if self.workspace is not None:
            self.workspace.rewind()

    def invalidate(self) -> None:
        """Slot contents changed (load/delete): rebuild plans on next forward."""
        self._drop()

    def clear(self) -> None:
        self.slots = None
        self.unique = ()
        self.kernel_rank = None
        self._drop()
        if self.workspace is not None:  # the plans holding its views are gone
            self.workspace.rewind()

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor the context keeps alive for the batch (tests check nothing outlives it)."""
        held = [t for cache in (self.layer_plans, self.kernel_plans) for p in cache.values() for t in p.tensors()]
        for g in self.group_outputs.values():
            held += [g.x, *g.outputs]
        if self.slot_groups is not None:
            g = self.slot_groups
            held += [g.group, g.place, g.flat] + ([g.rows] if g.rows is not None else [])
        if self.slots is not None:
            held.append(self.slots)
        return held

    @property
    def empty(self) -> bool:
        """No plan, rank, output or row grouping cached."""
        return not (self.layer_plans or self.kernel_plans or self.group_ranks or self.group_outputs
                    or self.slot_groups is not None)

    def _drop(self) -> None:
        self.layer_plans = {}
        self.kernel_plans = {}
        self.group_ranks = {}
        self.group_outputs = {}
        self.slot_groups = None
