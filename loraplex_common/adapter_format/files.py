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
from typing import Iterator

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Files whose presence means pickled weights: the whole adapter is refused at onboarding.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class AdapterBytes:
    """An adapter's two files as bytes. `sha256` is of `weights`, computed on first use (the
    store checks it against the record before handing the bytes on; an engine given a directory
    of its own never needs it, so loading from a path does not pay for hashing); `name` names
    the adapter in messages (e.g. "acme@v2" or the directory it was read from)."""

    config: bytes = field(repr=False)
    weights: bytes = field(repr=False)
    name: str = "adapter"

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()

    @classmethod
    def of(cls, config: bytes, weights: bytes, name: str = "adapter") -> "AdapterBytes":
        return cls(config, weights, name)

    @classmethod
    def read_dir(cls, directory: str | os.PathLike) -> "AdapterBytes":
        """Both files of a trusted directory (tests, tools, an engine given a path), read once each.
        Raises FileNotFoundError naming the missing file, OSError."""
        d = Path(directory)
        return cls.of((d / CONFIG_FILE).read_bytes(), (d / WEIGHTS_FILE).read_bytes(), str(d))

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
