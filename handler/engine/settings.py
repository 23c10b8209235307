"""`EngineSettings`: everything an engine is built with, passed in once (never read from the
environment inside the engine; the one config loader, `loraplex_common.config`, owns `LORAPLEX_*`).

Capacity has one name, `num_slots`: the slots of each target linear's pool. Slot 0 is the base
model (all zeros), so `num_slots - 1` adapters can be loaded at once. `decode_graph_buckets` is
the number of static KV caches + CUDA graphs a multilora engine keeps (least recently used dropped).
"""
from __future__ import annotations

from dataclasses import dataclass

from loraplex_common.adapter_format import DEFAULT_TARGET_MODULES

DECODE_MODES = ("auto", "generate", "static", "graphs")
LORA_BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class EngineSettings:
    num_slots: int = 10          # slots per pool; slot 0 = the base model (all zeros); adapters loadable = num_slots - 1
    max_rank: int = 64
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    decode: str = "auto"         # auto | generate | static | graphs
    decode_graph_buckets: int = 8
    # auto: Triton kernels where they pay off (CUDA graph capture, torch.compile, CUDA prefill groups);
    # torch: never the kernels; triton: always (on a CPU through Triton's interpreter, for tests)
    lora_backend: str = "auto"
    triton_pdl: bool = True      # programmatic dependent launch in the fused decode GEMMs (sm_90+)
    cpu_gather_workspace_mb: int = 512

    def __post_init__(self) -> None:
        if self.num_slots < 2:
            raise ValueError(f"num_slots must be >= 2 (slot 0 is the base model), got {self.num_slots}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")
        if not self.target_modules or isinstance(self.target_modules, str):
            raise ValueError("target_modules must be a non-empty sequence of module names")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.decode not in DECODE_MODES:
            raise ValueError(f"unknown decode mode {self.decode!r} (expected one of {', '.join(DECODE_MODES)})")
        if self.decode_graph_buckets < 1:
            raise ValueError(f"decode_graph_buckets must be >= 1, got {self.decode_graph_buckets}")
        if self.lora_backend not in LORA_BACKENDS:
            raise ValueError(f"unknown lora_backend {self.lora_backend!r} "
                             f"(expected one of {', '.join(LORA_BACKENDS)})")
        if self.cpu_gather_workspace_mb < 0:
            raise ValueError(f"cpu_gather_workspace_mb must be >= 0, got {self.cpu_gather_workspace_mb}")
