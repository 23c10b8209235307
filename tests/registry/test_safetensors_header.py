"""The header parser: agrees with the reference library on good files, and on any bytes it either
parses or raises HeaderError -- never another exception (fuzzed with hypothesis)."""
from __future__ import annotations

import io
import json
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from tenant_registry.safetensors_header import HeaderError, read_header


def _parse(data: bytes):
    return read_header(io.BytesIO(data), len(data))


def test_matches_reference_library(tiny_adapters):
    path = tiny_adapters["c"] / "adapter_model.safetensors"
    tensors, _ = _parse(path.read_bytes())
    with safe_open(str(path), framework="numpy") as f:
        ref = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: t.shape for k, t in tensors.items()} == ref


def _file(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_overlap_and_gap_refused():
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    assert set(_parse(_file(good, b"\0" * 12))[0]) == {"a", "b"}
    for bad in ({**good, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                {**good, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
                {**good, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 12]}},
                {**good, "b": {"dtype": "Q4", "shape": [1], "data_offsets": [8, 12]}}):
        try:
            _parse(_file(bad, b"\0" * 16))
        except HeaderError:
            continue
        raise AssertionError(f"accepted {bad}")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data):
    try:
        _parse(data)
    except HeaderError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=12),
       st.binary(max_size=64))
def test_random_json_headers(header, data):
    raw = json.dumps(header).encode()
    try:
        _parse(struct.pack("<Q", len(raw)) + raw + data)
    except HeaderError:
        pass
