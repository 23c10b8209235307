"""Gated-SiLU MLPs whose gate/up LoRA is fused into the activation (CUDA prefill).

Why: a Llama-style MLP computes ``down(silu(gate(x)) * up(x))``. Served by the
layers, each of gate and up writes a full-width LoRA delta that its base GEMM
then reads back; in a 1B prefill those two deltas were the largest part of
LoRA's extra memory traffic (bench/RESULTS.md). Here the MLP's forward runs the
two base GEMMs plain, and one kernel (`kernels.group_gated_act`) adds both
expands in registers while it applies ``silu(g) * u``: the deltas are never
written, and the activation reads g and u once, where the model's own
``act(g) * u`` takes two elementwise passes.

Which MLPs: instances of the classes in `GATED_SILU_MLPS` (transformers' forward
is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` for each; checked in
transformers 5.17 and 5.23), with a
SiLU ``act_fn`` and gate/up wrapped as one bias-free `SharedInputGroup`. Their
instance ``forward`` is replaced by `GatedMlpForward`, which falls back to the
class's own forward for every batch `SharedInputGroup.gated_act` does not serve
(decode steps, CPU, no adapter on any row, beam search, torch.compile).

Owned by the engine's thread, like the layers.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from .context import BatchContext

if TYPE_CHECKING:
    from .groups import SharedInputGroup
    from .layer import MultiLoraLinear

GATED_SILU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


class GatedMlpForward:
    """An MLP instance's ``forward``: the fused prefill where the group serves the batch, the
    class's forward otherwise. Holds the MLP weakly (the MLP holds this object)."""

    def __init__(self, mlp: nn.Module, group: "SharedInputGroup", ctx: BatchContext) -> None:
        self._mlp = weakref.ref(mlp)
        self._class_forward = type(mlp).forward
        self.group = group
        self._ctx = ctx

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mlp = self._mlp()
        h = None if args or kwargs else self.group.gated_act(x, self._ctx)
        if h is None:
            return self._class_forward(mlp, x, *args, **kwargs)
        return mlp.down_proj(h)


def attach_gated_mlps(model: nn.Module, layers: "dict[str, MultiLoraLinear]", ctx: BatchContext) -> int:
    """Install `GatedMlpForward` on every MLP that qualifies (see the module docstring); returns
    how many. Call after `groups.build_groups`."""
    count = 0
    for name, gate in layers.items():
        parent_name, _, leaf = name.rpartition(".")
        if leaf != "gate_proj":
            continue
        mlp = model.get_submodule(parent_name) if parent_name else model
        up = layers.get(f"{parent_name}.up_proj" if parent_name else "up_proj")
        group = gate.group
        if (type(mlp).__name__ not in GATED_SILU_MLPS or not _is_silu(getattr(mlp, "act_fn", None))
                or up is None or getattr(mlp, "gate_proj", None) is not gate or getattr(mlp, "up_proj", None) is not up
                or not hasattr(mlp, "down_proj") or group is None or group.layers != (gate, up) or not group.prefill
                or gate.base_layer.bias is not None or up.base_layer.bias is not None):
            continue
        mlp.forward = GatedMlpForward(mlp, group, ctx)
        count += 1
    return count


def _is_silu(act: object) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
