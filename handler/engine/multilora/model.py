"""`MultiLoraModel`: PEFT's multi-adapter names and meanings over a slot pool.

Why a facade with PEFT's vocabulary: callers (and tests) can swap it for a
`PeftModel` and expect the same behaviour for `load_adapter`, `set_adapter`,
`delete_adapter`, `disable_adapter()` and `adapter_names=`; what differs is
cost: loading copies into a preallocated slot, switching is choosing an
index, and a batch mixing adapters is one forward pass.

Concurrency: owned by one thread. The per-batch slot context is shared state.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import AdapterAlreadyLoaded, AdapterNotLoaded, BatchShapeError, EngineError, NoFreeSlot
from ..kernels.triton_lora import MAX_RANK as KERNEL_MAX_RANK  # plain Python: needs neither triton nor CUDA
from . import slot_loader
from ..settings import EngineSettings
from .adapter_file import AdapterSource, ParsedAdapter, linear_layers, read_adapter
from .context import BatchContext, GatherWorkspace
from .gated_mlp import attach_gated_mlps
from .groups import build_groups
from .backend import LoraBackend
from .layer import MultiLoraLinear

BASE_MARKER = "__base__"  # PEFT's name for "no adapter on this row"


class MultiLoraModel(nn.Module):
    """Wraps a transformers causal LM; replaces each target linear once, at construction.

    Semantics (PEFT's unless noted):

    * `load_adapter` loads but does not activate.
    * `set_adapter(name)` picks the adapter for calls that pass no `adapter_names`.
    * `adapter_names=[...]` (one per row) overrides it per row; ``"__base__"`` or
      None = base model for that row.
    * `delete_adapter` of the active adapter leaves *no* active adapter (calls
      without `adapter_names` then run the base model). PEFT would silently
      switch to another adapter; for a multi-tenant server that is a leak.
    * While adapters are disabled every row runs the base model, whatever
      `adapter_names` says (PEFT's `disable_adapter` meaning).

    `group_decode`, `group_prefill`, `decode_fused` and `gated_mlp` (all on by default)
    choose the GPU group paths of `groups` and `gated_mlp`; they change speed, never
    results, and exist so the bench can time the engine with each one off.
    `settings` (`..settings.EngineSettings`) sizes the pool (`num_slots`, `max_rank`, `target_modules`)
    and caps the memory a CPU engine keeps for gathering mixed batches' adapters between calls
    (`cpu_gather_workspace_mb`, 0: none; see `context.GatherWorkspace`).
    """

    def __init__(self, model: nn.Module, settings: EngineSettings | None = None, *, group_decode: bool = True,
                 group_prefill: bool = True, decode_fused: bool = True, gated_mlp: bool = True) -> None:
        super().__init__()
        settings = settings if settings is not None else EngineSettings()
        self.settings = settings
        self.model = model
        self.max_rank = settings.max_rank
        self.num_slots = settings.num_slots
        self.target_modules = settings.target_modules
        cpu_gather_workspace_bytes = settings.cpu_gather_workspace_mb << 20
        self._ctx = BatchContext(backend=LoraBackend(settings.lora_backend, settings.triton_pdl))
        self._layers: dict[str, MultiLoraLinear] = {}
        self._wrap()
        if not self._layers:
            raise EngineError(f"no nn.Linear matches target modules {self.target_modules}")
        # What adapters are checked against (every linear, the wrapped ones adaptable): the module tree
        # never changes after wrapping, so it is walked once here, not on every load.
        self._linear_layers = linear_layers(self.model, self.target_modules)
        # Mixed batches on a CPU gather rows' adapters into memory kept across calls, up to
        # `cpu_gather_workspace_bytes` (`context.GatherWorkspace`); never on CUDA, whose caching
        # allocator already keeps memory.
        self._ctx.workspace = GatherWorkspace(self._pool.dtype, self._pool.device,
                                              cpu_gather_workspace_bytes if self._pool.device.type == "cpu" else 0)
        # Graph-captured decode steps and CUDA prefill compute q/k/v (and gate/up) deltas in one
        # launch pair (`groups`), decode steps with the expand fused into Triton GEMMs
        # (`decode_fused`); the flags exist so the bench can time the engine without them.
        self._groups = (build_groups(self._layers, self._pool, self._scales, group_decode, group_prefill,
                                     decode_fused) if group_decode or group_prefill else [])
        # CUDA prefill of Llama-style MLPs: gate/up's LoRA fused into silu(g) * u (`gated_mlp`)
        self._gated_mlps = attach_gated_mlps(self.model, self._layers, self._ctx) if gated_mlp and group_prefill else 0
        self._slots: dict[str, int] = {}
        self._configs: dict[str, Any] = {}
        self._free = list(range(self.num_slots - 1, 0, -1))  # pop() hands out the lowest slot first
        self._active: str | None = None
        self._disabled = False
        # CUDA load staging, reused across loads and grown only for a bigger file (see `_fill_slot`):
        # the file's data bytes in pinned host memory, their device copy (both allocated on the
        # first load), and the event marking the end of the H2D copy that reads the host bytes
        # (the next load waits on it before overwriting them). A CPU pool keeps none of them.
        self._staging: torch.Tensor | None = None
        self._staging_dev: torch.Tensor | None = None
        self._staging_read: torch.cuda.Event | None = None
        # Where each wrapped layer's A and B^T blocks start in a pool row (the same in every slot;
        # fixed at wrapping): what `image_from_bytes` lays an adapter out by on any thread.
        row0 = self._pool[0].storage_offset()
        self._row_offsets = {name: (layer.lora_A[0].storage_offset() - row0, layer.lora_Bt[0].storage_offset() - row0)
                             for name, layer in self._layers.items()}

    # -- construction --------------------------------------------------------
    def _wrap(self) -> None:
        targets: list[tuple[str, nn.Linear]] = []
        for name, module in self.model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in self.target_modules and type(module) is nn.Linear:
                targets.append((name, module))
        if not targets:
            return
        w = targets[0][1].weight
        if any(m.weight.dtype != w.dtype or m.weight.device != w.device for _, m in targets):
            raise EngineError("target linears must share one dtype and device (no device_map splits)")
        # One slot-major buffer [K, P]: per layer an A block and a B^T block, each
        # aligned to 64 elements. Scalings live in a separate [L, K] tensor so each
        # layer's [K] vector is contiguous (what the Triton kernel expects).
        r, offsets, p = self.max_rank, [], 0
        for _, m in targets:
            a_off = p
            p = _align(a_off + r * m.in_features)
            b_off = p
            p = _align(b_off + r * m.out_features)
            offsets.append((a_off, b_off))
        self._pool = torch.zeros(self.num_slots, p, dtype=w.dtype, device=w.device)
        self._scales = torch.zeros(len(targets), self.num_slots, dtype=w.dtype, device=w.device)
        K = self.num_slots
        for index, ((name, linear), (a_off, b_off)) in enumerate(zip(targets, offsets)):
            a = self._pool[:, a_off: a_off + r * linear.in_features].view(K, r, linear.in_features)
            bt = self._pool[:, b_off: b_off + r * linear.out_features].view(K, r, linear.out_features)
            scaling = self._scales[index]
            layer = MultiLoraLinear(linear, self._ctx, index, a, bt, scaling)
            parent_name, _, leaf = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, leaf, layer)
            self._layers[name] = layer

    @property
    def lora_layers(self) -> dict[str, MultiLoraLinear]:
        """Module name (as in the base model) -> wrapped layer."""
        return dict(self._layers)

    @property
    def device(self) -> torch.device:
        return self._pool.device

    @property
    def lora_backend(self) -> LoraBackend:
        """The LoRA path every layer takes (from `settings.lora_backend` / `triton_pdl`)."""
        return self._ctx.backend

    def set_lora_backend(self, mode: str) -> None:
        """Switch every layer to another `lora_backend` (``auto | torch | triton``); for tests and
        benches comparing paths on one model. Not during a batch (owner thread, between calls)."""
        if self._ctx.slots is not None:
            raise EngineError("set_lora_backend inside a batch")
        self._ctx.backend = LoraBackend(mode, self._ctx.backend.pdl)

    # -- adapter management -------------------------------------------------
    def load_adapter(self, source: AdapterSource, adapter_name: str) -> float:
        """Copy a PEFT adapter (a directory, or the verified bytes of one: `AdapterBytes`) into a free
        slot; returns elapsed ms. Does not activate it."""
        t0 = time.perf_counter()
        self._check_loadable(adapter_name)
        host: list[torch.Tensor] = []  # the host buffer a directory's weights file is read into
        parsed = read_adapter(source, self._linear_layers, self.max_rank,
                              into=lambda nbytes: self._host_buffer(nbytes, host))
        lora_config = _to_lora_config(dict(parsed.config.raw))
        read_into = host[0] if host else None
        self._into_free_slot(adapter_name, lora_config, lambda slot: self._fill_slot(slot, parsed, read_into))
        return (time.perf_counter() - t0) * 1000.0

    def slot_image(self, adapter_name: str) -> slot_loader.SlotImage:
        """A host copy of the loaded adapter exactly as its slot holds it (`slot_loader.SlotImage`:
        each layer's A[:r] and Bt[:r] in the pool's dtype, the scalings, the config), which
        `load_image` puts back into a free slot with contiguous copies only. On CUDA the copy is
        in page-locked memory (gathered on the device, one device-to-host copy) and this waits for it."""
        slot = self._slot_of(adapter_name)
        row = self._pool[slot]
        base = row.storage_offset()
        spans: list[tuple[int, int]] = []
        for layer in self._layers.values():
            r = layer.slot_rank[slot]
            if r:
                spans.append((layer.lora_A[slot].storage_offset() - base, r * layer.in_features))
                spans.append((layer.lora_Bt[slot].storage_offset() - base, r * layer.out_features))
        runs = slot_loader.coalesce(spans)
        n = sum(k for _, k in runs)
        on_cuda = self.device.type == "cuda"
        data = slot_loader.host_tensor(n, self._pool.dtype, pin=on_cuda)
        if on_cuda:
            staged = self._device_staging(n)
            slot_loader.gather_runs(row, runs, staged)
            data.copy_(staged, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
            copied.synchronize()
        else:
            slot_loader.gather_runs(row, runs, data)
        layers = self._layers.values()
        return slot_loader.SlotImage(data, runs, tuple(l.slot_rank[slot] for l in layers),
                                     tuple(l.slot_scale[slot] for l in layers), self._configs[adapter_name],
                                     self._image_layout())

    def image_from_bytes(self, source: AdapterSource) -> slot_loader.SlotImage:
        """The `slot_image` that `load_adapter(source)` would leave, bit for bit, made on the host
        from the verified bytes: the same checks (`read_adapter`, the engine's errors), then each
        layer's A and B^T converted to the pool's dtype (and B transposed) by host copies into the
        image (page-locked for a CUDA pool, plain memory if none is left). Any thread: it reads
        only what wrapping fixed (the layers, their offsets in a pool row, the pool's dtype and
        layout) and touches no slot, so the worker's adapter fetch thread prepares a store load
        with it and the owner thread's part of the load is `load_image` (one host-to-device copy,
        then contiguous device copies)."""
        parsed = read_adapter(source, self._linear_layers, self.max_rank)
        header = parsed.header
        data = _held_buffer(parsed.source)
        if data is None:
            data = torch.empty(header.data_len, dtype=torch.uint8)
            slot_loader.copy_data(parsed.source.weights, header, data)
        else:
            data = data[header.data_start: header.data_start + header.data_len]
        by_module = {m.module: m for m in parsed.modules}
        ranks: list[int] = []
        scales: list[float] = []
        blocks: list[tuple[int, torch.Tensor]] = []  # (start in a pool row, [r, features] source) per block
        for name, layer in self._layers.items():
            m = by_module.get(name)
            a = None if m is None else slot_loader.tensor_view(data, header.tensors[m.key_a])
            r = 0 if a is None else int(a.shape[0])
            ranks.append(r)
            scales.append(float(m.scale) if r else 0.0)
            if r:
                a_off, b_off = self._row_offsets[name]
                blocks.append((a_off, a))
                blocks.append((b_off, slot_loader.tensor_view(data, header.tensors[m.key_b]).t()))
        blocks.sort(key=lambda block: block[0])
        runs = slot_loader.coalesce([(start, src.numel()) for start, src in blocks])
        out = slot_loader.host_tensor(sum(n for _, n in runs), self._pool.dtype, pin=self.device.type == "cuda")
        at = 0
        for _, src in blocks:  # in row order: the runs' elements back to back, as `slot_image` gathers them
            out[at: at + src.numel()].view(src.shape).copy_(src)
            at += src.numel()
        return slot_loader.SlotImage(out, runs, tuple(ranks), tuple(scales), _to_lora_config(dict(parsed.config.raw)),
                                     self._image_layout())

    def load_image(self, image: slot_loader.SlotImage, adapter_name: str) -> float:
        """Load a `slot_image` of this pool's layout into a free slot (what `load_adapter` of the
        same adapter would leave there, bit for bit); returns elapsed ms. Does not activate it.
        On CUDA one host-to-device copy of the image, then device copies into the slot."""
        t0 = time.perf_counter()
        self._check_loadable(adapter_name)
        if image.layout != self._image_layout():
            raise EngineError(f"slot image for a pool of layout {image.layout}, this pool's is {self._image_layout()}")
        self._into_free_slot(adapter_name, image.config, lambda slot: self._write_image(slot, image))
        return (time.perf_counter() - t0) * 1000.0

    def _check_loadable(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_MARKER:
            raise EngineError(f"invalid adapter name {adapter_name!r}")
        if adapter_name in self._slots:
            raise AdapterAlreadyLoaded(f"adapter {adapter_name!r} is already loaded; delete it first")
        if not self._free:
            raise NoFreeSlot(f"no free adapter slot: all {self.num_slots - 1} are in use; delete one first")

    def _into_free_slot(self, adapter_name: str, lora_config: Any, fill: Callable[[int], None]) -> None:
        """`fill` a free slot for `adapter_name`; a failed fill leaves the slot zeroed and free again."""
        slot = self._free.pop()
        try:
            fill(slot)
        except BaseException:
            self._clear_slot(slot)
            self._free.append(slot)
            raise
        self._slots[adapter_name] = slot
        self._configs[adapter_name] = lora_config
        self._ctx.invalidate()

    def _image_layout(self) -> tuple[int, torch.dtype, int]:
        return (int(self._pool.shape[1]), self._pool.dtype, len(self._layers))

    def _device_staging(self, n: int) -> torch.Tensor:
        """The first `n` elements (pool dtype) of the reusable device staging buffer (CUDA only)."""
        nbytes = n * self._pool.element_size()
        self._staging_dev = slot_loader.ensure_bytes(self._staging_dev, nbytes, device=self.device)
        return self._staging_dev[:nbytes].view(self._pool.dtype)

    def _write_image(self, slot: int, image: slot_loader.SlotImage) -> None:
        """Copy the image into the (zeroed) slot: the runs of its row, each layer's scaling and rank."""
        row = self._pool[slot]
        if self.device.type == "cuda":
            staged = self._device_staging(image.data.numel())
            staged.copy_(image.data, non_blocking=True)  # one H2D copy (from page-locked memory)
            slot_loader.scatter_runs(staged, image.runs, row)
        else:
            slot_loader.scatter_runs(image.data, image.runs, row)
        for layer, r, scale in zip(self._layers.values(), image.ranks, image.scales):
            if r:
                layer.mark_slot(slot, r, scale)

    def _host_buffer(self, nbytes: int, keep: list) -> memoryview:
        """Where an adapter loaded from a directory has its weights file read: the host buffer the
        slot copy reads from (pinned and reused on CUDA, fresh for one load on a CPU), so the file's
        bytes are read once and never copied on the host (`_fill_slot`). Appends the tensor to `keep`."""
        on_cuda = self.device.type == "cuda"
        if on_cuda and self._staging_read is not None:
            self._staging_read.synchronize()  # the previous H2D copy may still be reading _staging
        buf = slot_loader.ensure_bytes(self._staging if on_cuda else None, nbytes, pin=on_cuda)
        if on_cuda:
            self._staging = buf
        keep.append(buf)
        return memoryview(buf.numpy())

    def _fill_slot(self, slot: int, parsed: ParsedAdapter, read_into: torch.Tensor | None = None) -> None:
        """Copy the adapter's tensors into the (zeroed) slot with one copy of the verified bytes'
        data region into the host staging buffer (none when the file was read straight into it:
        `read_into`, see `_host_buffer`, or when the bytes come with a buffer nobody writes: the
        host tier's, `AdapterBytes.buffer`) and, on CUDA, one host-to-device copy; dtype
        conversion and B's transpose happen in the device-side copy into the slot (`slot_loader`
        says why). Called by `load_adapter` only (the owner thread).

        On CUDA the byte buffers are kept: pinning a fresh host buffer per load costs more than
        the copy. This returns without waiting for the GPU: later work on the current stream
        (forwards, `_clear_slot`) is ordered after the copies anyway, and only the host buffer
        needs protecting, so the next load waits on `_staging_read` before reusing it. On CPU
        the buffer lives for one load only, so the engine holds no more memory with every
        adapter deleted than before the first load (what tests/engine/test_cycles.py checks).
        """
        # No zeroing here: a free slot is always all zeros (pool created zeroed; `delete_adapter`
        # and a failed load clear the slot before it goes back to `_free`), which saves a
        # memset of the whole slot (r_max rows in every layer) on every load.
        on_cuda = self.device.type == "cuda"
        if read_into is None and self._staging_read is not None:
            self._staging_read.synchronize()  # the previous H2D copy may still be reading _staging
        tensors = parsed.header.tensors
        n = parsed.header.data_len
        start = parsed.header.data_start
        held = _held_buffer(parsed.source)
        if read_into is not None:  # the weights file was read into this buffer: its data region is a slice
            data = read_into[start:start + n]
        elif held is not None:  # bytes nobody writes while held (the host tier's copy): read in place
            data = held[start:start + n]
        else:
            host = slot_loader.ensure_bytes(self._staging, n, pin=on_cuda)
            slot_loader.copy_data(parsed.source.weights, parsed.header, host)
            data = host[:n]
            if on_cuda:
                self._staging = host
        if on_cuda:
            self._staging_dev = slot_loader.ensure_bytes(self._staging_dev, n, device=self.device)
            self._staging_dev[:n].copy_(data, non_blocking=True)
            data = self._staging_dev[:n]
            if self._staging_read is None:
                self._staging_read = torch.cuda.Event()
            self._staging_read.record(torch.cuda.current_stream(self.device))
        for m in parsed.modules:
            self._layers[m.module].write_slot(slot, slot_loader.tensor_view(data, tensors[m.key_a]),
                                              slot_loader.tensor_view(data, tensors[m.key_b]), m.scale,
                                              non_blocking=True)

    def _clear_slot(self, slot: int) -> None:
        """Zero the slot's full extent in every layer (one memset): a reused slot never shows old values."""
        self._pool[slot].zero_()
        self._scales[:, slot].zero_()
        for layer in self._layers.values():
            layer.forget_slot(slot)

    def delete_adapter(self, adapter_name: str) -> None:
        """Free (and zero) the adapter's slot. Deleting the active adapter leaves none active."""
        slot = self._slot_of(adapter_name)
        self._clear_slot(slot)
        del self._slots[adapter_name]
        del self._configs[adapter_name]
        self._free.append(slot)
        if self._active == adapter_name:
            self._active = None
        self._ctx.invalidate()

    def set_adapter(self, adapter_name: str) -> None:
        """Default adapter for calls without `adapter_names`: just a name, no work."""
        self._slot_of(adapter_name)
        self._active = adapter_name

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def active_adapters(self) -> list[str]:
        return [self._active] if self._active else []

    @property
    def peft_config(self) -> dict[str, Any]:
        """Adapter name -> `peft.LoraConfig`, as PEFT exposes it."""
        return dict(self._configs)

    def slot_of(self, adapter_name: str) -> int:
        return self._slot_of(adapter_name)

    def _slot_of(self, adapter_name: str) -> int:
        try:
            return self._slots[adapter_name]
        except KeyError:
            raise AdapterNotLoaded(f"adapter {adapter_name!r} is not loaded "
                                   f"(loaded: {sorted(self._slots) or 'none'})") from None

    def disable_adapters(self) -> None:
        self._disabled = True

    def enable_adapters(self) -> None:
        self._disabled = False

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Base model only inside the block (restores the previous state even on error)."""
        was = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = was

    def get_model_status(self) -> dict[str, Any]:
        return {
            "engine": "multilora",
            "active_adapter": self._active,
            "adapters_enabled": not self._disabled,
            "loaded_adapters": {n: {"slot": s, "rank": self._configs[n].r} for n, s in sorted(self._slots.items())},
            "num_slots": self.num_slots,
            "free_slots": len(self._free),
            "max_rank": self.max_rank,
            "target_modules": list(self.target_modules),
            "num_lora_layers": len(self._layers),
            "pool_bytes": self.pool_bytes(),
            "gather_workspace_bytes": self._ctx.workspace.nbytes,
            "device": str(self.device),
            # kernel variants Triton compiled in this process (0 without CUDA kernels): constant after warmup
            "triton_variants": self._ctx.backend.kernels.compiled_variants() if self._ctx.backend.kernels else 0,
        }

    def release_gather_workspace(self) -> int:
        """Free the memory mixed batches gather adapters into (it is kept between calls so
        the next mixed batch does not fault its pages in again); returns the bytes freed.
        The next mixed batch allocates it again."""
        freed = self._ctx.workspace.nbytes
        self._ctx.workspace.release()
        return freed

    @property
    def pool(self) -> torch.Tensor:
        """The ``[K, P]`` buffer every layer's slot views point into (slot 0 = always zero)."""
        return self._pool

    def pool_bytes(self) -> int:
        return (self._pool.numel() + self._scales.numel()) * self._pool.element_size()

    def adapter_nbytes(self, adapter_name: str) -> int:
        """Bytes the adapter's weights occupy inside the pool at their true rank (padding excluded)."""
        slot = self._slot_of(adapter_name)
        total = 0
        for l in self._layers.values():
            r = l.slot_rank[slot]
            total += r * (l.in_features + l.out_features) * l.lora_A.element_size()
        return total

    # -- forward -----------------------------------------------------------
    def resolve_slots(self, adapter_names: Sequence[str | None] | None, batch_size: int) -> list[int]:
        """Slot per row (0 = base). Unknown names raise before any compute."""
        if self._disabled:
            return [0] * batch_size
        if adapter_names is None:
            slot = self._slots[self._active] if self._active else 0
            return [slot] * batch_size
        if len(adapter_names) != batch_size:
            raise BatchShapeError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch_size}")
        return [0 if (n is None or n == BASE_MARKER) else self._slot_of(n) for n in adapter_names]

    @contextlib.contextmanager
    def batch(self, adapter_names: Sequence[str | None] | None, batch_size: int) -> Iterator[None]:
        """Set the per-row slots for everything run inside the block."""
        slots = self.resolve_slots(adapter_names, batch_size)
        unique = tuple(sorted(set(slots)))
        if unique == (0,):
            self._ctx.clear()
        else:
            self._ctx.set(torch.tensor(slots, dtype=torch.long, device=self.device), unique)
        try:
            yield
        finally:
            self._ctx.clear()

    @contextlib.contextmanager
    def static_batch(self, slots: torch.Tensor, rank: int) -> Iterator[None]:
        """Forwards that read each row's slot from `slots` when they *run*, through the
        Triton kernels at rank `rank` (zero-padded slots make any smaller rank exact).
        What a CUDA graph captures inside this block replays correctly after the caller
        writes other slots into the same tensor, or loads/deletes adapters (the pool is
        written in place). Needs `decode_rank` to have returned a rank (kernels usable)."""
        if slots.device != self.device or slots.dtype != torch.long or slots.dim() != 1:
            raise EngineError("static_batch needs a 1-D long slot tensor on the model's device")
        self._ctx.set(slots, tuple(range(self.num_slots)), kernel_rank=int(rank))
        try:
            yield
        finally:
            self._ctx.clear()

    def decode_rank(self, slots: Sequence[int]) -> int | None:
        """Rank bucket a static batch of these slots runs at: 0 when no row has an adapter
        (the captured step is then the plain base model), else the largest rank in use
        rounded up to a power of two (>= 16, <= the pool's max rank), so a few graphs
        serve every mix. None: the kernels cannot serve it (no CUDA/triton, the torch
        backend forced, or a rank above the kernels' limit)."""
        used = {s for s in slots if s}
        if not used or self._disabled:
            return 0
        if not self.device.type == "cuda" or not self._ctx.backend.usable:
            return None
        r = max(layer.slot_rank[s] for layer in self._layers.values() for s in used)
        if r == 0:
            return 0
        bucket = min(max(16, 1 << (r - 1).bit_length()), self.max_rank)
        return bucket if bucket <= KERNEL_MAX_RANK else None

    def warm_prefill_kernels(self) -> int:
        """Compile, now, every variant of the Triton kernels an eager CUDA prefill through the layer
        groups can launch (`kernels.triton_lora.warm_prefill`, once per distinct group shape), so
        that Triton's JIT (about a second per variant) never runs while a request waits. Call on
        the engine's thread before serving. Returns the launches made (0: no prefill group runs
        the kernels here, e.g. a CPU or the torch backend)."""
        kernels = self._ctx.backend.kernels
        if kernels is None or self.device.type != "cuda":
            return 0
        seen: set[tuple] = set()
        launches = 0
        with torch.inference_mode():
            for g in self._groups:
                shape = (g.in_features, tuple(m.out for m in g.members))
                if not g.prefill or shape in seen:
                    continue
                seen.add(shape)
                launches += kernels.warm_prefill(g.pool, g.scales, g.members, g.in_features, self.max_rank,
                                                 gated=self._gated_mlps > 0)
        return launches

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        n = _batch_size(input_ids, kwargs)
        with self.batch(adapter_names, n):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        input_ids = args[0] if args else kwargs.get("input_ids")
        n = _batch_size(input_ids, kwargs)
        with self.batch(adapter_names, n):
            return self.model.generate(*args, **kwargs)


def _held_buffer(source: Any) -> torch.Tensor | None:
    """`AdapterBytes.buffer` when it is a CPU uint8 tensor holding exactly the weights bytes (the
    host tier's copy, which the slot copy may read in place), else None."""
    buf = getattr(source, "buffer", None)
    if (isinstance(buf, torch.Tensor) and buf.dtype == torch.uint8 and buf.dim() == 1 and buf.device.type == "cpu"
            and buf.numel() == len(source.weights)):
        return buf
    return None


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


def _batch_size(input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> int:
    if input_ids is not None:
        return int(input_ids.shape[0])
    emb = kwargs.get("inputs_embeds")
    if emb is None:
        raise EngineError("need input_ids or inputs_embeds")
    return int(emb.shape[0])


def _to_lora_config(config: dict[str, Any]) -> Any:
    """PEFT's own config object, so `peft_config[name]` means what it means in PEFT."""
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in config.items() if k in known and k != "peft_type"})
