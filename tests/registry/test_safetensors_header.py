"""The one safetensors header parser (loraplex_common.adapter_format.header): agrees with the
`safetensors` library on good files, refuses what it refuses (header limit included), and on any
bytes it either parses or raises HeaderError -- never another exception (fuzzed with hypothesis)."""
from __future__ import annotations

import json
import struct

import pytest
import safetensors
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from loraplex_common.adapter_format import MAX_HEADER_BYTES, HeaderError, parse_header


def _parse(data: bytes):
    return parse_header(data).tensors


def test_matches_reference_library(tiny_adapters):
    path = tiny_adapters["c"] / "adapter_model.safetensors"
    tensors = _parse(path.read_bytes())
    with safe_open(str(path), framework="numpy") as f:
        ref = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: t.shape for k, t in tensors.items()} == ref


def _file(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
BAD = {
    "overlap": _file({**GOOD, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 16),
    "gap": _file({**GOOD, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, b"\0" * 16),
    "size_vs_shape": _file({**GOOD, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 12]}}, b"\0" * 12),
    "unknown_dtype": _file({**GOOD, "b": {"dtype": "Q4", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12),
    "trailing_bytes": _file(GOOD, b"\0" * 16),
    "truncated_data": _file(GOOD, b"\0" * 10),
    "not_an_object": _file([1, 2], b""),  # type: ignore[arg-type]
    "too_short": b"\x01\x02\x03",
    "header_past_end": struct.pack("<Q", 10_000) + b"{}",
    "header_over_limit": struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}",
}


def test_good_file_parses():
    h = parse_header(_file(GOOD, b"\0" * 12))
    assert set(h.tensors) == {"a", "b"} and h.data_len == 12 and h.data_start + 12 == len(_file(GOOD, b"\0" * 12))


@pytest.mark.parametrize("case", sorted(BAD))
def test_refuses_what_safetensors_refuses(case):
    data = BAD[case]
    with pytest.raises(HeaderError):
        parse_header(data)
    with pytest.raises(Exception):  # the reference refuses the same bytes
        safetensors.deserialize(data)


def test_header_limit_is_the_reference_limit():
    """A header of exactly the limit is not refused for its length (by either); one byte more is, by both."""
    at_limit = struct.pack("<Q", MAX_HEADER_BYTES) + b"{}"
    with pytest.raises(HeaderError, match="truncated"):
        parse_header(at_limit)
    with pytest.raises(Exception, match="invalid header length"):
        safetensors.deserialize(at_limit)
    with pytest.raises(HeaderError, match="exceeds the 100000000-byte limit"):
        parse_header(BAD["header_over_limit"])
    with pytest.raises(Exception, match="header too large"):
        safetensors.deserialize(BAD["header_over_limit"])


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
