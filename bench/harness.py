"""What the benches share: Llama-shaped models of named sizes with random weights,
PEFT-saved random adapters, clocks and per-forward timers, spread statistics,
environment info and the JSON line.

Imported by the scripts of this folder as ``import harness`` (a script's own
folder is first on ``sys.path``); tests never import it, they run the scripts.
Figures live in bench/RESULTS.md, never here.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from loraplex_common.adapter_format import DEFAULT_TARGET_MODULES as TARGETS  # adapters on all seven

# Llama-shaped configurations (random weights): smollm2-135m is the demo model's shape, 1b / 8b Llama 3.2 1B /
# Llama 3.1 8B's; tiny is for smoke tests.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# -- models and adapters ------------------------------------------------------
def build_base(size: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A LlamaForCausalLM of `size` with random weights (seed 0), eval mode, no EOS (every call
    generates exactly the tokens asked for)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=4096, bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def clone_sharing_params(model: nn.Module) -> nn.Module:
    """A new module tree over the same parameter tensors (no extra weight memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def make_adapters(base: nn.Module, root: Path, n: int, rank: int, alpha: int,
                  targets: Sequence[str] = TARGETS) -> list[Path]:
    """n PEFT-saved adapters ``a0..a{n-1}`` (fp32 files, as PEFT saves them), random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    work = clone_sharing_params(base)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    pm = get_peft_model(work, cfg, adapter_name="a0")
    paths = []
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        name = f"a{i}"
        if i:
            pm.add_adapter(name, cfg)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if f".{name}." in pname and ("lora_A" in pname or "lora_B" in pname):
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
        out = root / name
        pm.save_pretrained(str(out), selected_adapters=[name], safe_serialization=True)
        sub = out / name  # PEFT nests non-default adapter names
        paths.append(sub if (sub / "adapter_config.json").exists() else out)
    pm.unload()
    del pm, work
    gc.collect()
    return paths


def param_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def live_tensor_bytes(device: torch.device) -> int:
    """GPU: `torch.cuda.memory_allocated`; CPU: bytes of every live tensor storage the GC finds."""
    gc.collect()
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        except Exception:
            continue
    return total


# -- clocks ---------------------------------------------------------------------
class Clock:
    """Time stamps for one device. CUDA: events on the current stream (what the GPU timeline
    spent between two points, host gaps included); CPU: `time.perf_counter` (``wall``) or
    `time.process_time` (``cpu``: excludes time the process was descheduled on a shared machine;
    meaningful with one intra-op thread)."""

    def __init__(self, device: torch.device, kind: str = "wall") -> None:
        if kind not in ("wall", "cpu"):
            raise ValueError(f"unknown clock {kind!r}")
        if kind == "cpu" and device.type == "cuda":
            raise ValueError("--clock cpu measures host CPU time; use the default clock on a GPU")
        self.device = device
        self.kind = kind
        self.cuda = device.type == "cuda"
        self._now = time.process_time if kind == "cpu" else time.perf_counter

    def stamp(self) -> Any:
        if self.cuda:
            if torch.cuda.is_current_stream_capturing():
                return None
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return self._now()

    def ms(self, a: Any, b: Any) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1000.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> float:
        """Milliseconds of one call of `fn` (synchronized on a GPU)."""
        self.sync()
        a = self.stamp()
        fn()
        b = self.stamp()
        self.sync()
        return self.ms(a, b)


@dataclass
class CallTiming:
    """One timed `generate` call: prefill and its decode steps.

    ``prefill_ms``: from the call to the end of the first forward (which produces the first
    token's logits), so it includes what the call does before its forward (input prep,
    per-call adapter gathers). ``steps_ms``: one entry per decode step, from one forward's
    start to the next's (the last to the call's end), when every step ran a forward;
    ``None`` when decode steps ran no forward (replayed CUDA graphs). ``decode_step_ms``:
    the median of ``steps_ms``, or else the mean (call end - first forward's end) / (N - 1).
    """

    prefill_ms: float
    decode_step_ms: float
    steps_ms: list[float] | None
    forwards: int


class ForwardTimer:
    """Time stamps of every forward of `model` (hooks on its top module) during `call`."""

    def __init__(self, model: nn.Module, clock: Clock) -> None:
        self.model = model
        self.clock = clock

    def call(self, fn: Callable[[], Any], new_tokens: int) -> CallTiming:
        starts: list[Any] = []
        ends: list[Any] = []

        def pre(_m: nn.Module, _a: Any) -> None:
            s = self.clock.stamp()
            if s is not None:
                starts.append(s)

        def post(_m: nn.Module, _a: Any, _o: Any) -> None:
            s = self.clock.stamp()
            if s is not None:
                ends.append(s)

        h1 = self.model.register_forward_pre_hook(pre)
        h2 = self.model.register_forward_hook(post)
        try:
            self.clock.sync()
            t0 = self.clock.stamp()
            fn()
            t_end = self.clock.stamp()
            self.clock.sync()
        finally:
            h1.remove()
            h2.remove()
        if not ends:
            raise RuntimeError("no forward of the timed model ran during the call")
        prefill = self.clock.ms(t0, ends[0])
        n_steps = new_tokens - 1
        if n_steps <= 0:
            return CallTiming(prefill, float("nan"), [], len(starts))
        if len(starts) == new_tokens:  # every decode step ran a forward
            marks = starts[1:] + [t_end]
            steps = [self.clock.ms(a, b) for a, b in zip(marks, marks[1:])]
            # the first decode step starts at forward 1; the time from prefill's end to it
            # (picking token 1) is added to that step
            steps = [self.clock.ms(ends[0], marks[0]) + steps[0]] + steps[1:] if steps else []
            return CallTiming(prefill, statistics.median(steps), steps, len(starts))
        return CallTiming(prefill, self.clock.ms(ends[0], t_end) / n_steps, None, len(starts))


# -- statistics -------------------------------------------------------------------
def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Spread:
    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    def summary(self) -> dict[str, float | int]:
        v = self.values
        if not v:
            return {"n": 0}
        return {"min": min(v), "median": med(v), "max": max(v), "n": len(v)}

    def rel_range(self) -> float:
        """(max - min) / median; nan with fewer than two values."""
        v = self.values
        if len(v) < 2 or not med(v):
            return float("nan")
        return (max(v) - min(v)) / abs(med(v))


# -- environment and output -------------------------------------------------------
def env_info(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__, "device_name": "cpu", "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except Exception:
            info["triton"] = None
    else:
        try:
            info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            pass
    return info


def rounded(o: Any, digits: int = 4) -> Any:
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else round(o, digits)
    if isinstance(o, dict):
        return {k: rounded(v, digits) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [rounded(v, digits) for v in o]
    return o


def emit(res: dict[str, Any], as_json: bool) -> None:
    """The result: one JSON object as the last stdout line (``--json``), else one ``key value`` per line."""
    res = rounded(res)
    if as_json:
        print(json.dumps(res))
        return
    for k, v in res.items():
        print(f"{k:40s} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
