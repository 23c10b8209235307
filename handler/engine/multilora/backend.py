"""Which path the LoRA layers take: decided once, when the engine is built, from
`EngineSettings.lora_backend` / `triton_pdl` (never read from the environment).

* ``auto``: the Triton kernels (`handler.engine.kernels`) where they pay off — inside CUDA-graph
  capture or torch.compile (where their launch cost vanishes) and for CUDA prefill through the
  layer groups (`groups`); eager one-token forwards use the torch ops, because Triton's Python
  launcher costs more host time per linear than the GPU work (bench/RESULTS.md).
* ``torch``: never the kernels (static CUDA-graph decoding is then unavailable).
* ``triton``: the kernels for every CUDA forward, and on a CPU for prefill groups (Triton's
  interpreter, ``TRITON_INTERPRET=1``; tests only).

The kernels are used only where they can run (triton importable, and CUDA or the interpreter);
elsewhere every mode is the torch path. Owned by the engine's thread, like the layers.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from ..settings import LORA_BACKENDS


@functools.lru_cache(maxsize=None)
def _find_kernels() -> ModuleType | None:
    """The Triton kernels package if it can run in this process (imported lazily, so CPU hosts
    without triton never touch it)."""
    try:
        from .. import kernels

        return kernels if kernels.available() else None
    except Exception:  # no triton, or a broken install: plain torch still works
        return None


class LoraBackend:
    """The resolved choice: `kernels` is the kernels package or None (torch only)."""

    __slots__ = ("mode", "kernels", "pdl")

    def __init__(self, mode: str = "auto", pdl: bool = True) -> None:
        if mode not in LORA_BACKENDS:
            raise ValueError(f"unknown lora_backend {mode!r} (expected one of {', '.join(LORA_BACKENDS)})")
        self.mode = mode
        self.pdl = bool(pdl)  # the fused decode kernels may use programmatic dependent launch (Hopper+)
        self.kernels: ModuleType | None = None if mode == "torch" else _find_kernels()

    @property
    def usable(self) -> bool:
        """Whether the kernels can serve a static (graph-captured) batch here."""
        return self.kernels is not None

    def eager_layer_kernels(self, x: torch.Tensor) -> bool:
        """Whether a layer's own (ungrouped) LoRA for this forward runs in the Triton kernel."""
        if self.kernels is None or not x.is_cuda:
            return False
        return self.mode == "triton" or torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling()

    def prefill_groups(self, x: torch.Tensor) -> bool:
        """Whether a multi-token forward's groups run through the kernels: on CUDA where they run,
        on a CPU only with ``triton`` (the interpreter). A CPU otherwise keeps the layers' torch
        path: grouping it the same way (one bmm shrink per group) measured no gain there."""
        return self.kernels is not None and (x.is_cuda or self.mode == "triton")

    def __repr__(self) -> str:
        return f"LoraBackend(mode={self.mode!r}, kernels={self.kernels is not None}, pdl={self.pdl})"
