"""Move an adapter file's bytes into the pool with one read and (on a GPU) one copy.

Why not `safe_open(...).get_tensor` per tensor: each call allocates a CPU
tensor, the fp32 -> bf16 conversion then runs on the CPU, and a GPU load
issues hundreds of small host-to-device copies; on an H100 that made a load
3-5x the floor (read the file's bytes + one pinned H2D copy). Here the data
region is read with one `readinto` into a reusable host byte buffer, copied
to the device in one transfer, and every tensor is a *view* of those bytes
in the file's dtype, so the conversion (and B's transpose) happens inside the
device-side `copy_` into the slot. CPU and CUDA take the same path, so CPU CI
tests the code that runs on GPUs.

The header is parsed here (not by safetensors) because the offsets are what
we need; `read_adapter` has already validated names and shapes, and
`TensorIndex.entry` re-checks each shape, so a file replaced between the two
reads fails loudly instead of broadcasting into the slot. Never `torch.load`.

Functions only: the buffers live on `MultiLoraModel`, which is owned by one
thread, so nothing here locks.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from ..errors import AdapterFormatError

# Float dtypes an adapter may be stored in; anything else is refused, not guessed at.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER_BYTES = 100_000_000  # the limit of safetensors' own reader


class TensorEntry(NamedTuple):
    """One tensor of the file; `begin`/`end` are byte offsets into the data region."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class TensorIndex:
    """A parsed safetensors header: where the data starts and each tensor's bytes."""

    path: Path
    data_start: int  # file offset of byte 0 of the data region (8 + header length)
    data_len: int  # bytes of the data region any tensor covers (from its start)
    tensors: dict[str, TensorEntry]

    def entry(self, key: str, shape: tuple[int, ...]) -> TensorEntry:
        """The tensor `key`, which must have `shape` (what `read_adapter` saw in the same file)."""
        e = self.tensors.get(key)
        if e is None:
            raise AdapterFormatError(f"{self.path}: tensor {key!r} is missing (did the file change while loading?)")
        if e.shape != tuple(shape):
            raise AdapterFormatError(f"{self.path}: tensor {key!r} has shape {list(e.shape)}, expected "
                                     f"{list(shape)} (did the file change while loading?)")
        return e


def parse_header(fh: BinaryIO, path: Path) -> TensorIndex:
    """Read and validate the header of the open file `fh` (positioned anywhere)."""
    size = os.fstat(fh.fileno()).st_size
    fh.seek(0)
    if size < 8:
        raise AdapterFormatError(f"{path}: {size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", fh.read(8))
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise AdapterFormatError(f"{path}: header length {n} exceeds the file ({size} bytes) "
                                 f"or the {MAX_HEADER_BYTES}-byte limit")
    raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + n
    tensors: dict[str, TensorEntry] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = _entry(path, key, info, size - data_start)
    data_len = max((e.end for e in tensors.values()), default=0)
    return TensorIndex(path, data_start, data_len, tensors)


def read_header(path: str | Path) -> TensorIndex:
    """`parse_header` for a path (tests and tools; loads use the already open file)."""
    path = Path(path)
    with open(path, "rb", buffering=0) as fh:
        return parse_header(fh, path)


def _entry(path: Path, key: str, info: object, room: int) -> TensorEntry:
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict):
        raise AdapterFormatError(f"{where}: header entry is not an object")
    name = info.get("dtype")
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise AdapterFormatError(f"{where}: unsupported dtype {name!r} "
                                 f"(supported: {', '.join(DTYPES)})")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise AdapterFormatError(f"{where}: bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= room):
        raise AdapterFormatError(f"{where}: data_offsets {offsets!r} out of range "
                                 f"(the data region holds {room} bytes; truncated file?)")
    begin, end = offsets
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need:
        raise AdapterFormatError(f"{where}: holds {end - begin} bytes but shape {shape} of {name} "
                                 f"needs {need}")
    return TensorEntry(dtype, tuple(shape), begin, end)


def ensure_bytes(buf: torch.Tensor | None, nbytes: int, *, device: torch.device | str = "cpu",
                 pin: bool = False) -> torch.Tensor:
    """A uint8 buffer of at least `nbytes`: `buf` itself when big enough, so steady-state
    loads allocate nothing (no pinning cost, no device-memory drift); a new one otherwise.
    The caller must make sure no pending copy still uses `buf` before dropping it."""
    if buf is not None and buf.numel() >= nbytes:
        return buf
    return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)


def read_data(fh: BinaryIO, index: TensorIndex, out: torch.Tensor) -> None:
    """Fill `out` (uint8, CPU, `index.data_len` bytes) with the data region: one `readinto`
    straight into the (pinned) buffer, no intermediate bytes object."""
    n = index.data_len
    view = memoryview(out.numpy())[:n]
    fh.seek(index.data_start)
    got = 0
    while got < n:  # a regular file returns everything at once; loop for the exotic ones
        k = fh.readinto(view[got:])
        if not k:
            raise AdapterFormatError(f"{index.path}: file ended after {got} of {n} data bytes "
                                     "(did it change while loading?)")
        got += k


def tensor_view(data: torch.Tensor, e: TensorEntry) -> torch.Tensor:
    """Tensor `e` as a view of the byte buffer `data`, in the file's dtype. `view(dtype)` needs
    the byte offset to be a multiple of the item size; safetensors does not promise that
    (mixed dtypes), so a misaligned tensor gets its bytes copied to a fresh (aligned) tensor."""
    raw = data[e.begin: e.end]
    if e.begin % e.dtype.itemsize:
        raw = raw.clone()
    return raw.view(e.dtype).view(e.shape)
