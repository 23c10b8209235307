"""`MultiLoraEngine`: serving rows with `MultiLoraModel` (`engine: multilora`).

Its job is decoding: it picks the decode mode, owns the `StaticDecoder`, falls
back to `generate` for a group the decoder cannot capture (and counts it), and
turns rows into groups (`..generation.run_rows`). A whole group of rows,
whatever their adapters, is one call: one forward per prefill/decode step.
Adapter state lives in the facade, `self.model` (PEFT's names: `set_adapter`,
`disable_adapter()`, ...); of it this class carries only what the `Engine`
protocol (serving) needs.

Decoding (`decode`): ``generate`` is transformers' `generate` with a dynamic
cache; ``graphs`` is `..static_decode.StaticDecoder` with every decode step
replayed from a captured CUDA graph (GPU; a batch the kernels cannot capture
falls back to ``generate``); ``static`` is the same static-cache loop run
eagerly (the CPU-testable twin of ``graphs``); ``auto`` = ``graphs`` where the
Triton kernels run on CUDA, else ``generate``.

Continuous batching (`stepper`): one `..stepping.Stepper` per engine, over the same
facade: rows join and leave between steps (`api.RowStepper`); its decode steps replay
CUDA graphs in decode mode ``graphs``, else run eagerly. While a stepper row uses an
adapter, `delete_adapter` refuses it.

Rows name their adapter explicitly (None = base model); the facade's
`set_adapter` only changes the default for its own calls without
`adapter_names`. While the facade's adapters are disabled every row runs the
base model.

Concurrency: owned by one thread; no method is thread-safe.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..api import GenerationOutput, GenerationRow, LoadedAdapter, StepLimits
from ..embedding import mean_pooled
from ..errors import EngineError
from ..generation import GroupOutput, hf_generate, run_rows
from ..settings import EngineSettings
from ..kernels.triton_lora import MAX_RANK as KERNEL_MAX_RANK  # plain Python: needs neither triton nor CUDA
from ..static_decode import NotCapturable, StaticDecoder
from ..stepping import Stepper
from .adapter_file import AdapterSource
from .model import MultiLoraModel
from .slot_loader import SlotImage


class MultiLoraEngine:
    kind = "multilora"

    def __init__(self, model: nn.Module, settings: EngineSettings, *, eos_token_ids: Sequence[int],
                 pad_token_id: int) -> None:
        decode = settings.decode
        model.eval()
        self.model = MultiLoraModel(model, settings)
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        if decode == "auto":
            decode = "graphs" if self.model.device.type == "cuda" and self.model.lora_backend.usable else "generate"
        if decode == "graphs" and self.model.device.type != "cuda":
            raise EngineError("decode mode 'graphs' needs the model on a CUDA device")
        self.decode = decode
        self.decoder = None if decode == "generate" else StaticDecoder(
            model, use_graphs=decode == "graphs", lora=self.model,
            decode_graph_buckets=settings.decode_graph_buckets)
        self.fallbacks = 0  # groups served by `generate` because the decoder could not capture them
        self.last_fallback = ""
        self._stepper: Stepper | None = None

    def load_adapter(self, source: AdapterSource, adapter_name: str) -> LoadedAdapter:
        ms = self.model.load_adapter(source, adapter_name)
        return LoadedAdapter(name=adapter_name, nbytes=self.model.adapter_nbytes(adapter_name), load_ms=ms)

    def slot_image(self, adapter_name: str) -> SlotImage:
        """A host copy of the loaded adapter in the pool's layout (`slot_loader.SlotImage`), which
        `load_image` loads back with contiguous copies: what the worker's host tier keeps."""
        return self.model.slot_image(adapter_name)

    def image_from_bytes(self, source: AdapterSource) -> SlotImage:
        """Any thread: the slot image `load_adapter(source)` would leave, made on the host
        (`MultiLoraModel.image_from_bytes`), for the worker's fetch thread to prepare a load with."""
        return self.model.image_from_bytes(source)

    def load_image(self, image: SlotImage, adapter_name: str) -> LoadedAdapter:
        """Load a `slot_image` of this engine into a free slot, as `load_adapter` would the adapter's bytes."""
        ms = self.model.load_image(image, adapter_name)
        return LoadedAdapter(name=adapter_name, nbytes=self.model.adapter_nbytes(adapter_name), load_ms=ms)

    def delete_adapter(self, adapter_name: str) -> None:
        """Refused while a stepper row runs on it (a safety net: the scheduler pins adapters in use)."""
        if self._stepper is not None and self._stepper.uses(adapter_name):
            raise EngineError(f"adapter {adapter_name!r} is in use by {self._stepper.uses(adapter_name)} running "
                              f"row(s); delete it when they finish")
        self.model.delete_adapter(adapter_name)

    def stepper(self, limits: StepLimits) -> Stepper:
        """The engine's one `stepping.Stepper` (built on the first call, and again for other limits
        while it is idle). Decode steps replay CUDA graphs in decode mode ``graphs`` when the LoRA
        kernels can serve the pool's largest rank; otherwise they run eagerly."""
        if self._stepper is not None:
            if self._stepper.limits == limits:
                return self._stepper
            if self._stepper.rows():
                raise EngineError("the stepper has rows running; it cannot be rebuilt with other limits")
            self._stepper = None  # its KV cache goes before the new one is allocated
        graph_ranks = None
        r = self.model.max_rank
        if self.decode == "graphs" and self.model.lora_backend.usable and r <= KERNEL_MAX_RANK:
            # what `decode_rank` returns: the largest rank in use rounded up to a power of two, >= 16, <= max_rank
            graph_ranks = sorted({min(max(16, 1 << (k - 1).bit_length()), r) for k in range(1, r + 1)})
        self._stepper = Stepper(self.model.model, limits, lora=self.model, eos_token_ids=self.eos_token_ids,
                                pad_token_id=self.pad_token_id, graph_ranks=graph_ranks)
        return self._stepper

    def embed(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:  # base only: no batch context is set here
        return mean_pooled(self.model.model, batch, pad_token_id=self.pad_token_id)

    def set_adapter(self, adapter_name: str) -> None:
        """PEFT's name, for users of the engine on its own: the adapter `active_adapter` reports and
        facade calls without `adapter_names` use. Not part of `Engine`: rows name their adapter, so
        serving never switches."""
        self.model.set_adapter(adapter_name)

    @property
    def active_adapter(self) -> str | None:
        return self.model.active_adapter

    @property
    def peft_config(self) -> Mapping[str, Any]:
        return self.model.peft_config

    def get_model_status(self) -> Mapping[str, Any]:
        status = dict(self.model.get_model_status())
        status["decode"] = self.decode
        if self.decoder is not None:
            status["decoder"] = {**self.decoder.describe(), "fallbacks": self.fallbacks,
                                 "last_fallback": self.last_fallback}
        if self._stepper is not None:
            status["stepper"] = self._stepper.describe()
        return status

    def _generate_group(self, ids: torch.Tensor, mask: torch.Tensor, adapters: list, kw: dict,
                        logprobs: int) -> GroupOutput:
        with torch.inference_mode():
            if self.decoder is not None:
                try:
                    return self.decoder.decode(ids, mask, adapters, logprobs=logprobs, **kw)
                except NotCapturable as exc:
                    self.fallbacks += 1
                    self.last_fallback = str(exc)
            return hf_generate(self.model.generate, ids, logprobs, attention_mask=mask, adapter_names=adapters, **kw)

    def generate(self, rows: Sequence[GenerationRow]) -> list[GenerationOutput]:
        return run_rows(rows, self._generate_group, eos_token_ids=self.eos_token_ids,
                        pad_token_id=self.pad_token_id, device=self.model.device)
