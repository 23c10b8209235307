"""Move an adapter's verified bytes into the pool with one host copy and (on a GPU) one H2D copy.

Why not per-tensor `safetensors.torch.load` + copy: each tensor becomes a CPU tensor of its own,
the fp32 -> bf16 conversion then runs on the CPU, and a GPU load issues hundreds of small
host-to-device copies; on an H100 that made a load 3-5x the floor. Here the data region of the
weights bytes (`AdapterBytes.weights`, whose sha256 the store checked: no second read of the file)
is copied once into a reusable (pinned) host byte buffer, copied to the device in one transfer,
and every tensor is a *view* of those bytes in the file's dtype, so the conversion (and B's
transpose) happens inside the device-side `copy_` into the slot. CPU and CUDA take the same path,
so CPU CI tests the code that runs on GPUs. Offsets come from the one header parser
(`loraplex_common.adapter_format.header`), already checked by `read_adapter`. Never `torch.load`.

Reloads from the worker's host tier skip all of that: `SlotImage` is an adapter already in the
pool's layout and dtype (taken from a loaded slot), put back with contiguous copies of whole
stretches of the pool row (`scatter_runs`).

Functions and one record only: the buffers live on `MultiLoraModel`, which is owned by one thread,
so nothing here locks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from loraplex_common.adapter_format import SafetensorsHeader, TensorInfo

from ..api import LoadedAdapter

log = logging.getLogger(__name__)

# The float dtypes the adapter rules accept (`FLOAT_DTYPES`), as torch dtypes.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def ensure_bytes(buf: torch.Tensor | None, nbytes: int, *, device: torch.device | str = "cpu",
                 pin: bool = False) -> torch.Tensor:
    """A uint8 buffer of at least `nbytes`: `buf` itself when big enough, so steady-state
    loads allocate nothing (no pinning cost, no device-memory drift); a new one otherwise.
    The caller must make sure no pending copy still uses `buf` before dropping it."""
    if buf is not None and buf.numel() >= nbytes:
        return buf
    return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)


def host_tensor(n: int, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
    """`n` elements of host memory, page-locked when `pin` and the allocation succeeds (page-locked
    memory can run out: then plain memory, which a host-to-device copy reads too, only not
    asynchronously)."""
    if pin:
        try:
            return torch.empty(n, dtype=dtype, pin_memory=True)
        except RuntimeError as exc:
            log.warning("no page-locked memory for %d bytes (%s); using plain memory",
                        n * torch.empty((), dtype=dtype).element_size(), exc)
    return torch.empty(n, dtype=dtype)


def copy_data(weights: bytes, header: SafetensorsHeader, out: torch.Tensor) -> None:
    """Fill `out` (uint8, CPU, at least `header.data_len` bytes) with the data region of the file
    bytes `weights`: one memcpy into the (pinned) buffer."""
    n, start = header.data_len, header.data_start
    memoryview(out.numpy())[:n] = memoryview(weights)[start: start + n]


def tensor_view(data: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """Tensor `info` as a view of the byte buffer `data`, in the file's dtype. `view(dtype)` needs
    the byte offset (in the buffer `data` is a view of) to be a multiple of the item size;
    safetensors does not promise that (mixed dtypes, a header of odd length), so a misaligned
    tensor gets its bytes copied to a fresh (aligned) tensor."""
    dtype = DTYPES[info.dtype]
    raw = data[info.begin: info.end]
    if raw.storage_offset() % dtype.itemsize:  # where the tensor starts in memory, data's own offset included
        raw = raw.clone()
    return raw.view(dtype).view(info.shape)


# -- slot images: an adapter in the pool's own layout, for reloads without a parse or a transpose --

@dataclass(frozen=True, eq=False)
class SlotImage:
    """An adapter as one slot of a pool holds it, kept off the device (`MultiLoraModel.slot_image`,
    loaded back by `MultiLoraModel.load_image`).

    Why: loading from the adapter's bytes parses the header, converts the dtype and transposes
    every B into the pool's ``[r, out]`` layout (a strided copy); an image is already in the pool's
    layout and dtype, so a reload is one contiguous copy per stretch of the pool row (coalesced:
    one stretch per layer's A[:r] and Bt[:r], merged where they touch), and on a GPU one
    host-to-device copy. `data` is never written after the image is made (it may be read by a
    pending copy), and it fits only a pool of the same layout (`layout`: refused elsewhere).
    """

    data: torch.Tensor  # 1-D, the pool's dtype, on the host (page-locked for a CUDA pool): the runs back to back
    runs: tuple[tuple[int, int], ...]  # (first element in a pool row, elements), in row order
    ranks: tuple[int, ...]  # per wrapped layer, in the pool's layer order (0: the adapter leaves it alone)
    scales: tuple[float, ...]  # per wrapped layer: the adapter's scaling (0.0 where its rank is 0)
    config: Any  # the adapter's `peft.LoraConfig`, what `peft_config` reports once it is loaded
    layout: tuple[int, torch.dtype, int]  # (pool row elements, pool dtype, wrapped layers)

    @property
    def nbytes(self) -> int:
        """Host memory the image holds (the adapter at its true rank, in the pool's dtype)."""
        return self.data.numel() * self.data.element_size()


@runtime_checkable
class LoadsSlotImages(Protocol):
    """An engine that can hand out and load back `SlotImage`s (the multilora engine; not PEFT's).
    `slot_image` and `load_image` on the engine's owner thread, `image_from_bytes` on any."""

    def slot_image(self, adapter_name: str) -> SlotImage:
        """A host copy of the loaded adapter as its slot holds it."""
        ...

    def image_from_bytes(self, source: Any) -> SlotImage:
        """What `slot_image` would give after `load_adapter(source)`, made on the host (any thread)."""
        ...

    def load_image(self, image: SlotImage, adapter_name: str) -> LoadedAdapter:
        """Load an image this engine made into a free slot, as `load_adapter` loads bytes."""
        ...


def coalesce(spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """(start, length) spans of a pool row, sorted, with empty ones dropped and touching ones merged."""
    out: list[list[int]] = []
    for start, n in sorted(s for s in spans if s[1] > 0):
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += n
        else:
            out.append([start, n])
    return tuple((s, n) for s, n in out)


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a 1-D contiguous CPU tensor, as a writable memoryview."""
    return memoryview(t.view(torch.uint8).numpy())


def gather_runs(row: torch.Tensor, runs: tuple[tuple[int, int], ...], out: torch.Tensor) -> None:
    """`out[:]` = the runs of the pool row `row`, back to back (both 1-D, one dtype and device)."""
    _copy_runs(row, runs, out, into_row=False)


def scatter_runs(data: torch.Tensor, runs: tuple[tuple[int, int], ...], row: torch.Tensor) -> None:
    """The runs of the pool row `row` = `data`'s elements, back to back (both 1-D, one dtype and device)."""
    _copy_runs(row, runs, data, into_row=True)


def _copy_runs(row: torch.Tensor, runs: tuple[tuple[int, int], ...], packed: torch.Tensor, *, into_row: bool) -> None:
    """On a CPU each run is one memcpy through byte views, on the calling thread: a large `copy_`
    spreads over torch's intra-op threads, and on a busy CPU waiting for them costs more than the
    copy (bench/RESULTS.md, `host_tier_reload.py`). On a GPU, stream-ordered device copies, all runs
    in one `torch._foreach_copy_` call (one dispatch for the ~2 runs per wrapped layer, instead
    of a Python-level `copy_` each)."""
    if row.device.type == "cpu":
        r, p, es = _byte_view(row), _byte_view(packed), row.element_size()
        at = 0
        for start, n in runs:
            if into_row:
                r[start * es:(start + n) * es] = p[at * es:(at + n) * es]
            else:
                p[at * es:(at + n) * es] = r[start * es:(start + n) * es]
            at += n
        return
    views = [row[start:start + n] for start, n in runs]
    parts = list(packed[:sum(n for _, n in runs)].split([n for _, n in runs]))
    if into_row:
        torch._foreach_copy_(views, parts, non_blocking=True)
    else:
        torch._foreach_copy_(parts, views, non_blocking=True)
