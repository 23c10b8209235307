"""The slot loader fills a slot from the adapter's bytes (one host copy of the data region, on a
GPU one H2D copy) exactly as per-tensor `safetensors.torch.load_file` + copy would (fp32 pool, and
a bf16 pool from an fp32 file), reuses its CUDA staging buffers, copes with tensors whose byte
offset is not a multiple of their item size, and refuses malformed weights (the one header
parser) with an `AdapterFormatError` naming the adapter, before any slot is touched."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from handler.engine import EngineSettings
from handler.engine.errors import AdapterFormatError, UnsupportedAdapter
from handler.engine.multilora import MultiLoraModel
from handler.engine.multilora.adapter_file import linear_layers, read_adapter
from handler.engine.multilora.slot_loader import copy_data, ensure_bytes, tensor_view
from loraplex_common.adapter_format import AdapterBytes, parse_header
from loraplex_testing.models import make_lora_with_config


def load_base(model_dir: Path, dtype=torch.float32, device="cpu"):
    """The tiny base model (not conftest's helper: `from conftest import` breaks when tests/handler,
    which has a conftest of its own, is collected in the same run)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()


def settings(slots: int = 3, rank: int = 16, **kw) -> EngineSettings:
    return EngineSettings(num_slots=slots, max_rank=rank, **kw)


def write_raw(path: Path, entries: dict, data: bytes, *, odd: bool = False, length: int | None = None) -> Path:
    """A safetensors file written byte by byte: the header JSON unpadded (safetensors' own writer
    pads it to 8 bytes), or padded to an odd length with `odd`; `length` overrides the declared
    header length."""
    header = json.dumps(entries).encode()
    if odd and len(header) % 2 == 0:
        header += b" "
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def entry(dtype: object, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# -- the data region as tensor views ---------------------------------------------
def test_views_of_a_good_file(tmp_path):
    tensors = {"x": torch.randn(3, 5), "y": torch.randn(2, 7).to(torch.bfloat16), "z": torch.randn(4).half()}
    path = tmp_path / "good.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    raw = path.read_bytes()
    header = parse_header(raw)
    assert header.data_start + header.data_len == len(raw)
    buf = torch.empty(header.data_len, dtype=torch.uint8)
    copy_data(raw, header, buf)
    for key, t in tensors.items():
        assert torch.equal(tensor_view(buf, header.tensors[key]), t)


# -- malformed weights are refused at load, naming the adapter --------------------
Q = "base_model.model.q_proj"
GOOD = {f"{Q}.lora_A.weight": entry("F32", [1, 3], 0, 12), f"{Q}.lora_B.weight": entry("F32", [5, 1], 12, 32)}
BAD_FILES = {
    "too_short": (lambda p: p.write_bytes(b"\x01\x02\x03"), AdapterFormatError, "too short"),
    "header_longer_than_file": (lambda p: write_raw(p, GOOD, bytes(32), length=10_000), AdapterFormatError,
                                "header claims 10000 bytes"),
    "truncated_data": (lambda p: write_raw(p, GOOD, bytes(20)), AdapterFormatError, "ends at byte 32"),
    "trailing_bytes": (lambda p: write_raw(p, GOOD, bytes(40)), AdapterFormatError, "8 bytes after the last tensor"),
    "wrong_byte_length": (lambda p: write_raw(p, {**GOOD, f"{Q}.lora_A.weight": entry("F32", [1, 3], 0, 8)},
                                              bytes(32)), AdapterFormatError, "size does not match"),
    "unsupported_dtype": (lambda p: write_raw(p, {**GOOD, f"{Q}.lora_A.weight": entry("I32", [1, 3], 0, 12)},
                                              bytes(32)), UnsupportedAdapter, "has dtype I32"),
    "not_json": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{" + bytes(8)), AdapterFormatError,
                 "not valid UTF-8 JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_weights_are_refused(tmp_path, case):
    make, exc, message = BAD_FILES[case]
    adapter = tmp_path / case
    adapter.mkdir()
    make(adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"], "bias": "none"}))
    ml = MultiLoraModel(_Toy(), settings(2, 2, target_modules=("q_proj",)))
    with pytest.raises(exc, match=re.escape(message)) as err:
        ml.load_adapter(adapter, "m")
    assert str(adapter) in str(err.value) and "adapter_model.safetensors" in str(err.value)
    assert not ml.pool.any()


# -- loading into the pool -------------------------------------------------------
@pytest.fixture(scope="module")
def patterned_subset(tiny_model_dir, tmp_path_factory) -> Path:
    """Mixed ranks (rank_pattern) over a subset of the target modules."""
    return make_lora_with_config(tiny_model_dir, tmp_path_factory.mktemp("slot-loader") / "ad", seed=31, r=8,
                                 lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                 rank_pattern={"q_proj": 4, "down_proj": 12}, alpha_pattern={"v_proj": 64})


def reference_fill(ml: MultiLoraModel, path: Path, slot: int) -> None:
    """The straightforward way: every tensor loaded by safetensors, cast, copied."""
    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    parsed = read_adapter(path, linear_layers(ml.model, ml.target_modules), ml.max_rank)
    dtype = ml.pool.dtype
    for m in parsed.modules:
        ml._layers[m.module].write_slot(slot, tensors[m.key_a].to(dtype), tensors[m.key_b].to(dtype), m.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["patterned_subset", "tiny_a", "tiny_c"])
def test_load_matches_load_file_and_copy(tiny_model_dir, tiny_adapters, patterned_subset, which, dtype):
    path = patterned_subset if which == "patterned_subset" else tiny_adapters[which[-1]]
    assert {t.dtype for t in load_file(str(path / "adapter_model.safetensors")).values()} == {torch.float32}
    ours = MultiLoraModel(load_base(tiny_model_dir, dtype), settings())
    ref = MultiLoraModel(load_base(tiny_model_dir, dtype), settings())
    ours.load_adapter(path, "x")
    reference_fill(ref, path, ours.slot_of("x"))
    assert ours.pool.dtype == dtype and ours.pool.any()
    assert torch.equal(ours.pool, ref.pool)
    assert torch.equal(ours._scales, ref._scales)
    for name, layer in ours.lora_layers.items():
        assert layer.slot_rank == ref.lora_layers[name].slot_rank
        assert layer.slot_scale == ref.lora_layers[name].slot_scale
    if which == "patterned_subset":
        ranks = {n.rsplit(".", 1)[-1]: l.slot_rank[1] for n, l in ours.lora_layers.items()}
        assert ranks == {"q_proj": 4, "k_proj": 0, "v_proj": 8, "o_proj": 0, "gate_proj": 0, "up_proj": 0,
                         "down_proj": 12}


def test_byte_buffer_is_reused_until_a_bigger_file_comes():
    buf = ensure_bytes(None, 100)
    assert buf.dtype == torch.uint8 and buf.numel() == 100
    assert ensure_bytes(buf, 100).data_ptr() == buf.data_ptr()
    assert ensure_bytes(buf, 60) is buf
    bigger = ensure_bytes(buf, 101)
    assert bigger.numel() == 101 and bigger.data_ptr() != buf.data_ptr()


def test_cpu_pool_keeps_no_staging(tiny_model_dir, tiny_adapters):
    """A CPU load reads into a buffer of its own (what the 1,000-cycle memory check needs)."""
    ml = MultiLoraModel(load_base(tiny_model_dir), settings())
    ml.load_adapter(tiny_adapters["c"], "c")
    assert ml._staging is None and ml._staging_dev is None and ml._staging_read is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_staging_is_reused(tiny_model_dir, tiny_adapters):
    ml = MultiLoraModel(load_base(tiny_model_dir, torch.bfloat16, "cuda"), settings())
    ml.load_adapter(tiny_adapters["c"], "c")  # the biggest of the three files
    host, dev = ml._staging.data_ptr(), ml._staging_dev.data_ptr()
    assert ml._staging.is_pinned() and ml._staging_dev.is_cuda
    ml.delete_adapter("c")
    ml.load_adapter(tiny_adapters["c"], "c2")
    ml.load_adapter(AdapterBytes.read_dir(tiny_adapters["a"]), "a")  # the worker's source: verified bytes
    assert (ml._staging.data_ptr(), ml._staging_dev.data_ptr()) == (host, dev)
    ref = MultiLoraModel(load_base(tiny_model_dir, torch.bfloat16, "cuda"), settings())
    reference_fill(ref, tiny_adapters["c"], ml.slot_of("c2"))
    reference_fill(ref, tiny_adapters["a"], ml.slot_of("a"))
    torch.cuda.synchronize()
    assert torch.equal(ml.pool, ref.pool)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(3, 5, bias=False)


def test_misaligned_tensor_offset_loads_correct_values(tmp_path):
    """lora_A is 3 fp16 values (6 bytes), so lora_B (fp32) starts at byte 6 of the data region;
    the header has an odd length for good measure."""
    a = np.arange(1, 4, dtype=np.float16).reshape(1, 3) / 4
    b = np.arange(1, 6, dtype=np.float32).reshape(5, 1) / 8
    entries = {"base_model.model.q_proj.lora_A.weight": entry("F16", [1, 3], 0, 6),
               "base_model.model.q_proj.lora_B.weight": entry("F32", [5, 1], 6, 26)}
    adapter = tmp_path / "misaligned"
    adapter.mkdir()
    write_raw(adapter / "adapter_model.safetensors", entries, a.tobytes() + b.tobytes(), odd=True)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"], "bias": "none"}))
    header = parse_header((adapter / "adapter_model.safetensors").read_bytes())
    assert header.data_start % 2 == 1 and header.tensors["base_model.model.q_proj.lora_B.weight"].begin % 4 == 2

    ml = MultiLoraModel(_Toy(), settings(2, 2, target_modules=("q_proj",)))
    ml.load_adapter(adapter, "m")
    layer = ml.lora_layers["q_proj"]
    slot = ml.slot_of("m")
    assert torch.equal(layer.lora_A[slot, :1], torch.from_numpy(a.astype(np.float32)))
    assert torch.equal(layer.lora_Bt[slot, :1], torch.from_numpy(b).t())
    assert not layer.lora_A[slot, 1:].any() and not layer.lora_Bt[slot, 1:].any()
    assert layer.slot_scale[slot] == 2.0
