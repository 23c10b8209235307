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

Functions only: the buffers live on `MultiLoraModel`, which is owned by one thread, so nothing
here locks.
"""
from __future__ import annotations

import torch

from loraplex_common.adapter_format import SafetensorsHeader, TensorInfo

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
