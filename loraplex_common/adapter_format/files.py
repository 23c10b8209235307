"""The two files of an adapter and `AdapterBytes`, an adapter held in memory.

Why in memory: the worker reads an adapter's bytes once, checks their sha256 against the
record, and the engine loads from those same bytes (`tenant_registry.store.AdapterStore.read`
builds them; `handler/engine` loads them). Re-opening the file to load it after hashing it would
load bytes nobody checked. Immutable; safe to hand between threads.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Files whose presence means pickled weights: the whole adapter is refused at onboarding.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")
MAX_CONFIG_BYTES = 1024 * 1024


Into = Callable[[int], memoryview]
"""Where a reader puts a file's bytes: called with the file's size, returns writable memory of at
least that many bytes (e.g. a `ReadBuffer`, or an engine's pinned staging buffer)."""


class ReadBuffer:
    """Memory that one reader's successive reads reuse (an `Into`): a byte buffer grown to the
    largest file read so far. Why: a fresh `bytes` per read of a tens-of-MB adapter pays a page
    fault per 4 KiB on every load, several times the cost of the read itself; a reused buffer is
    faulted in once. What it hands out is valid until the next call: the caller must be done
    with the previous read's bytes by then. Owned by one thread (the worker's, for its store)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def nbytes(self) -> int:
        return len(self._buf)

    def __call__(self, nbytes: int) -> memoryview:
        if nbytes > len(self._buf):
            self._buf = bytearray(nbytes)
        return memoryview(self._buf)[:nbytes]


def read_file(fh: BinaryIO, size: int, into: Into | None = None) -> bytes | memoryview:
    """The `size` bytes of the open file `fh`: a fresh `bytes`, or read in place into
    `into(size)`. Raises OSError when the file is shorter than `size` (changed while read)."""
    if into is None:
        data = fh.read(size + 1)
        if len(data) != size:
            raise OSError(f"file changed size while being read ({len(data)} of {size} bytes)")
        return data
    view = into(size)[:size]
    got = 0
    while got < size:
        n = fh.readinto(view[got:])
        if not n:
            raise OSError(f"file changed size while being read ({got} of {size} bytes)")
        got += n
    return view


@dataclass(frozen=True)
class AdapterBytes:
    """An adapter's two files as bytes. `sha256` is of `weights`, computed on first use (the
    store checks it against the record before handing the bytes on; an engine given a directory
    of its own never needs it, so loading from a path does not pay for hashing); `name` names
    the adapter in messages (e.g. "acme@v2" or the directory it was read from).

    `weights` is a `bytes`, or a `memoryview` into memory its reader reuses (`ReadBuffer`, an
    engine's staging buffer): then it is valid until that reader's next read, so it is loaded
    right after it is read and never kept.

    `buffer`: a 1-D uint8 torch tensor that owns `weights` (same bytes, same length) and whose
    memory is never written while anyone holds it: the worker's host tier's copy (page-locked
    on a GPU worker). An engine may then read the weights in place, with no copy into its own
    staging memory; None: `weights` only."""

    config: bytes = field(repr=False)
    weights: bytes | memoryview = field(repr=False)
    name: str = "adapter"
    buffer: Any = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()

    @classmethod
    def of(cls, config: bytes, weights: bytes | memoryview, name: str = "adapter",
           buffer: Any = None) -> "AdapterBytes":
        return cls(config, weights, name, buffer)

    @classmethod
    def read_dir(cls, directory: str | os.PathLike, into: Into | None = None) -> "AdapterBytes":
        """Both files of a trusted directory (tests, tools, an engine given a path), read once each,
        the weights into `into` when given. Raises FileNotFoundError naming the missing file, OSError."""
        d = Path(directory)
        config = (d / CONFIG_FILE).read_bytes()
        with open(d / WEIGHTS_FILE, "rb", buffering=0) as fh:
            weights = read_file(fh, os.fstat(fh.fileno()).st_size, into)
        return cls.of(config, weights, str(d))

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[Path]:
        """These bytes written to a private temporary directory (mode 0700) for a reader that only
        takes a path (PEFT's `from_pretrained`); removed on exit."""
        d = Path(tempfile.mkdtemp(prefix="loraplex-adapter-"))
        try:
            (d / CONFIG_FILE).write_bytes(self.config)
            (d / WEIGHTS_FILE).write_bytes(self.weights)
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
