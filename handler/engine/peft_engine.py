"""`PeftGroupedEngine` (`engine: peft`): plain PEFT underneath, one `generate`
per adapter group.

Why keep it: it is the behaviour users know and the oracle the slot-pool
engine is tested against; it also gives operators a fallback.

Two PEFT dislikes are handled by keeping the `PeftModel` optional:

* *No adapter loaded yet*: `PeftModel` cannot exist without an adapter, so the
  engine serves the bare transformers model until the first load, which wraps
  it with `PeftModel.from_pretrained`.
* *Last adapter deleted*: PEFT leaves a model with LoRA layers and no adapter.
  The engine instead `unload()`s (removes the LoRA layers without merging) and
  goes back to the bare model, so base rows cost exactly the base model again.

Base rows run under `disable_adapter()`. Adapters are validated by the same
reader as the slot-pool engine before PEFT sees them, so both engines refuse
the same adapters with the same error types; `num_slots`/`max_rank` are
enforced for parity.

Concurrency: owned by one thread; no method is thread-safe.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .api import GenerationOutput, GenerationRow, LoadedAdapter, RowStepper, StepLimits
from .embedding import mean_pooled
from .errors import AdapterAlreadyLoaded, AdapterNotLoaded, EngineError, NoFreeSlot
from .generation import GroupOutput, hf_generate, run_rows
from .logprobs import StepLogprobs
from .multilora.adapter_file import AdapterSource, linear_layers, read_adapter
from .multilora.model import BASE_MARKER
from .settings import EngineSettings


class PeftGroupedEngine:
    kind = "peft"

    def __init__(self, model: nn.Module, settings: EngineSettings, *, eos_token_ids: Sequence[int],
                 pad_token_id: int) -> None:
        model.eval()
        self.base = model
        self.peft_model: Any = None  # peft.PeftModel once an adapter is loaded
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.num_slots = settings.num_slots  # as in the multilora engine: num_slots - 1 adapters at once
        self.max_rank = settings.max_rank
        self.target_modules = settings.target_modules
        self._layers = linear_layers(model, self.target_modules)  # of the bare model, before PEFT wraps it
        self._nbytes: dict[str, int] = {}
        self._active: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    # -- adapter management -------------------------------------------------
    def load_adapter(self, source: AdapterSource, adapter_name: str) -> LoadedAdapter:
        t0 = time.perf_counter()
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_MARKER:
            raise EngineError(f"invalid adapter name {adapter_name!r}")
        if adapter_name in self._nbytes:
            raise AdapterAlreadyLoaded(f"adapter {adapter_name!r} is already loaded; delete it first")
        if len(self._nbytes) >= self.num_slots - 1:
            raise NoFreeSlot(f"no free adapter slot: all {self.num_slots - 1} are in use; delete one first")
        parsed = read_adapter(source, self._layers, self.max_rank)
        from peft import PeftModel

        # PEFT loads from a path: the checked bytes, written to a private temporary directory.
        with parsed.source.as_directory() as path:
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(self.base, str(path), adapter_name=adapter_name,
                                                            is_trainable=False)
                self.peft_model.eval()
            else:
                self.peft_model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=False)
        ms = (time.perf_counter() - t0) * 1000.0
        nbytes = sum(p.numel() * p.element_size() for n, p in self.peft_model.named_parameters()
                     if f".{adapter_name}." in n and (".lora_A." in n or ".lora_B." in n))
        self._nbytes[adapter_name] = nbytes
        return LoadedAdapter(name=adapter_name, nbytes=nbytes, load_ms=ms)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check(adapter_name)
        if len(self._nbytes) == 1:
            self.peft_model.unload()  # back to the bare model: no LoRA layers left behind
            self.peft_model = None
        else:
            self.peft_model.delete_adapter(adapter_name)
        del self._nbytes[adapter_name]
        if self._active == adapter_name:
            self._active = None  # PEFT would silently activate another tenant's adapter

    def set_adapter(self, adapter_name: str) -> None:
        """PEFT's name, for users of the engine on its own: sets `active_adapter` (reported by
        describe). Not part of `Engine`: rows name their adapter, so serving never switches."""
        self._check(adapter_name)
        self.peft_model.set_adapter(adapter_name)
        self._active = adapter_name

    def _check(self, adapter_name: str) -> None:
        if adapter_name not in self._nbytes:
            raise AdapterNotLoaded(f"adapter {adapter_name!r} is not loaded (loaded: {sorted(self._nbytes) or 'none'})")

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def peft_config(self) -> Mapping[str, Any]:
        return dict(self.peft_model.peft_config) if self.peft_model is not None else {}

    def stepper(self, limits: StepLimits) -> RowStepper:
        """None here: PEFT's forward splits a batch per adapter, so there is no one-forward decode step."""
        raise EngineError("continuous scheduling needs engine: multilora")

    def embed(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:  # base only: PEFT's adapters disabled
        return mean_pooled(self.base, batch, pad_token_id=self.pad_token_id,
                           base_only=self.peft_model.disable_adapter if self.peft_model is not None else None)

    def get_model_status(self) -> Mapping[str, Any]:
        return {
            "engine": "peft",
            "active_adapter": self._active,
            "loaded_adapters": {n: {"rank": self.peft_model.peft_config[n].r} for n in sorted(self._nbytes)},
            "num_slots": self.num_slots,
            "free_slots": self.num_slots - 1 - len(self._nbytes),
            "max_rank": self.max_rank,
            "target_modules": list(self.target_modules),
            "device": str(self.device),
        }

    # -- generation ---------------------------------------------------------
    def _run(self, adapter: str | None, ids: torch.Tensor, mask: torch.Tensor, kw: dict, k: int) -> GroupOutput:
        if adapter is None or self.peft_model is None:
            if self.peft_model is None:
                return hf_generate(self.base.generate, ids, k, attention_mask=mask, **kw)
            with self.peft_model.disable_adapter():
                return hf_generate(self.peft_model.generate, ids, k, attention_mask=mask, **kw)
        self.peft_model.set_adapter(adapter)
        return hf_generate(self.peft_model.generate, ids, k, attention_mask=mask, **kw)

    def _generate_group(self, ids: torch.Tensor, mask: torch.Tensor, adapters: list, kw: dict,
                        logprobs: int) -> GroupOutput:
        for a in adapters:
            if a is not None and a != BASE_MARKER:
                self._check(a)
        width = ids.shape[1]
        per_row: list[torch.Tensor | None] = [None] * ids.shape[0]
        per_row_lp: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * ids.shape[0]
        order: dict[str | None, list[int]] = {}
        for i, a in enumerate(adapters):
            order.setdefault(None if a == BASE_MARKER else a, []).append(i)
        with torch.inference_mode():
            for adapter, rows in order.items():
                sub_mask = mask[rows]
                lead = int((sub_mask.sum(0) == 0).long().cumprod(0).sum())  # shared left padding, trimmed
                sub = self._run(adapter, ids[rows, lead:], sub_mask[:, lead:], kw, logprobs)
                for j, i in enumerate(rows):
                    per_row[i] = sub.sequences[j, width - lead:]
                    if sub.logprobs is not None:
                        got = sub.logprobs
                        per_row_lp[i] = (got.chosen[j].cpu(), got.top_ids[j].cpu(), got.top_values[j].cpu())
        longest = max(t.shape[0] for t in per_row)  # groups may stop early on EOS
        out = torch.full((ids.shape[0], width + longest), self.pad_token_id, dtype=torch.long)
        out[:, :width] = ids.cpu()
        for i, t in enumerate(per_row):
            out[i, width: width + t.shape[0]] = t.cpu()
        if not logprobs:
            return GroupOutput(out)
        n, k = ids.shape[0], per_row_lp[0][1].shape[-1]
        chosen = torch.zeros(n, longest)
        top_ids = torch.zeros(n, longest, k, dtype=torch.long)
        top_values = torch.zeros(n, longest, k)
        for i, (c, ti, tv) in enumerate(per_row_lp):  # type: ignore[misc]
            chosen[i, :c.shape[0]], top_ids[i, :c.shape[0]], top_values[i, :c.shape[0]] = c, ti, tv
        return GroupOutput(out, StepLogprobs(chosen, top_ids, top_values))

    def generate(self, rows: Sequence[GenerationRow]) -> list[GenerationOutput]:
        return run_rows(rows, self._generate_group, eos_token_ids=self.eos_token_ids,
                        pad_token_id=self.pad_token_id, device=self.device)
