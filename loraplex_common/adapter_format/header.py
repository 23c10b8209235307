"""The one safetensors header parser (strict; no tensor data is read, torch is not needed).

Why our own parser and not `safetensors.safe_open` for the header: the control plane checks
adapters without torch, both sides need exact, named errors for truncated or corrupt files
(header length beyond the file, JSON that is not an object, duplicate keys, offsets that
overlap or leave gaps, sizes that disagree with dtype x shape, bytes after the last tensor),
and the worker's loader needs the byte offsets to copy the whole data region in one transfer.
The checks are those of the `safetensors` library itself (it refuses the same files, and the
tests hold the two against each other); its header limit is `MAX_HEADER_BYTES`.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data buffer.
Pure functions; safe from any thread.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import BinaryIO

# The `safetensors` library's own limit (0.8: a 100,000,001-byte header is "header too large").
MAX_HEADER_BYTES = 100_000_000

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class HeaderError(ValueError):
    """The bytes are not a well-formed safetensors file; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: its dtype name as in the file, its shape, and its bytes [begin, end) of the data region."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header. `data_start` is the file offset of byte 0 of the data region (8 + N);
    the tensors tile the data region exactly, so it holds `data_len` bytes."""

    data_start: int
    data_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def header_length(prefix: bytes, file_size: int) -> int:
    """The header length N from the file's first 8 bytes, checked against the file size and the limit."""
    if file_size < 8 or len(prefix) < 8:
        raise HeaderError(f"truncated: {file_size} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2:
        raise HeaderError(f"corrupt header: header length {n} is too small")
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"corrupt header: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise HeaderError(f"truncated: header claims {n} bytes but the file has only {file_size - 8} after the length")
    return n


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise HeaderError(f"duplicate key {k[:80]!r} in header")
        out[k] = v
    return out


def parse_header(data: bytes | memoryview, file_size: int | None = None) -> SafetensorsHeader:
    """Parse and check the header at the start of `data` (the whole file, or at least its first
    8 + N bytes when `file_size` gives the file's size). Raises HeaderError."""
    size = len(data) if file_size is None else file_size
    n = header_length(bytes(data[:8]), size)
    raw = bytes(data[8: 8 + n])
    if len(raw) != n:
        raise HeaderError("truncated while reading the header")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except HeaderError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeaderError(f"corrupt header: not valid UTF-8 JSON ({str(e)[:120]})") from None
    if not isinstance(doc, dict):
        raise HeaderError("corrupt header: the JSON header is not an object")

    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise HeaderError("corrupt header: __metadata__ must map strings to strings")

    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, info in doc.items():
        where = f"tensor {name[:120]!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"corrupt header: {where} must have exactly dtype, shape and data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise HeaderError(f"corrupt header: {where} has unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise HeaderError(f"corrupt header: {where} has a malformed shape")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise HeaderError(f"corrupt header: {where} has malformed data_offsets")
        if offs[1] > data_len:
            raise HeaderError(f"truncated: {where} ends at byte {offs[1]} of a {data_len}-byte data section")
        if math.prod(shape) * DTYPE_SIZES[dtype] != offs[1] - offs[0]:
            raise HeaderError(f"corrupt header: {where} size does not match dtype {dtype} x shape {shape}")
        tensors[name] = TensorInfo(dtype, tuple(shape), offs[0], offs[1])

    # Tensors must tile the data section exactly: no overlap, no gap, no trailing bytes.
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != pos:
            raise HeaderError("corrupt header: tensor data overlaps or leaves a gap")
        pos = t.end
    if pos != data_len:
        raise HeaderError(f"corrupt file: {data_len - pos} bytes after the last tensor"
                          if pos < data_len else "truncated data section")
    return SafetensorsHeader(8 + n, data_len, tensors, metadata)


def read_header(fh: BinaryIO, file_size: int) -> SafetensorsHeader:
    """`parse_header` of an open file (e.g. a base model shard) of `file_size` bytes, reading only
    its first 8 + N bytes."""
    fh.seek(0)
    prefix = fh.read(8)
    n = header_length(prefix, file_size)
    return parse_header(prefix + fh.read(n), file_size)
