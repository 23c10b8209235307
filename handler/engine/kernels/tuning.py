"""What a kernel bench needs to time the Triton LoRA kernels under chosen launch shapes.

The engine never calls this module: it launches through `triton_lora`'s public entry points, which
pick the launch shape themselves (`choose_config` and the group launchers' defaults). A bench
imports these names instead of `triton_lora`'s private helpers:

* `KernelConfig`, `choose_config(...)`: the mixed-LoRA launch shape (``**override`` replaces fields).
* `add_mixed_with_config(out, x, slots, A, Bt, scaling, rank, cfg)`: `add_mixed_triton_` under `cfg`
  (no custom-op dispatch, no precondition asserts: call `add_mixed_triton_` once first to check).
* `shrink_partials(cfg, tokens, device)` + `shrink_into(partials, x, A, slots, scaling, rank, cfg)`:
  the shrink launch alone, into preallocated fp32 partials ``[split, tokens, block_r]``.
* `pdl_enabled(device)`: whether decode launches on `device` use programmatic dependent launch
  (the engine additionally honours `EngineSettings.triton_pdl`).
* `group_prefill_deltas(x, pool, scales, slots, members, d_in, rank, cfg)`: a prefill group's deltas
  (``x [N, S, in]``) under a launch-shape dict (``block_m``, ``block_k``, ``block_o``,
  ``warps_shrink``, ``warps_expand``, ``stages``); `group_gated_act(..., cfg=)` takes the same keys
  plus ``warps_act``.
* `decode_linear_shape(rows, d_in, d_out, fp32)`: ``(BLOCK_N, BLOCK_K, stages)`` the fused decode GEMM
  (`group_decode_linears`) uses.

Importing this module needs neither triton nor CUDA; the launches do.
"""
from __future__ import annotations

import torch

from .triton_lora import (GroupMember, KernelConfig, _add_mixed_impl, _decode_linear_shape, _group_deltas_rows,
                          _run_shrink, _use_pdl, choose_config, group_gated_act)

__all__ = ["KernelConfig", "choose_config", "add_mixed_with_config", "shrink_partials", "shrink_into",
           "pdl_enabled", "GroupMember", "group_prefill_deltas", "group_gated_act", "decode_linear_shape"]


def add_mixed_with_config(out: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, A: torch.Tensor,
                          Bt: torch.Tensor, scaling: torch.Tensor, rank: int, cfg: KernelConfig) -> None:
    """``out += LoRA(x)`` per row's slot, launched with `cfg` (see `triton_lora.add_mixed_triton_`)."""
    _add_mixed_impl(out, x, slots, A, Bt, scaling, rank, cfg)


def shrink_partials(cfg: KernelConfig, tokens: int, device: torch.device | str) -> torch.Tensor:
    """The fp32 ``[split, tokens, block_r]`` buffer a shrink under `cfg` writes."""
    return torch.empty((cfg.split, tokens, cfg.block_r), dtype=torch.float32, device=device)


def shrink_into(partials: torch.Tensor, x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor,
                scaling: torch.Tensor, rank: int, cfg: KernelConfig) -> torch.Tensor:
    """The shrink launch alone (``x [N, S, in]``): k-split partial sums of ``scale * x @ A[slot].T``."""
    _run_shrink(x, A, slots, scaling, rank, cfg, partials)
    return partials


def pdl_enabled(device: torch.device | str) -> bool:
    return _use_pdl(torch.device(device))


def group_prefill_deltas(x: torch.Tensor, pool: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor,
                         members: "list[GroupMember] | tuple[GroupMember, ...]", d_in: int, rank: int,
                         cfg: dict | None = None) -> list[torch.Tensor]:
    """`group_deltas_triton`'s prefill layout under a launch-shape dict (keys in the module docstring)."""
    return _group_deltas_rows(x, pool, scales, slots, members, d_in, rank, cfg)


def decode_linear_shape(rows: int, d_in: int, d_out: int, fp32: bool) -> tuple[int, int, int]:
    return _decode_linear_shape(rows, d_in, d_out, fp32)
