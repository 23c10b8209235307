"""Builders of hostile adapter directories: each starts from a real PEFT adapter and breaks one thing.

Each builder takes (src_dir: a pristine copy it may modify, outside: a directory outside src_dir) and
returns the AdapterInvalid.code validation must report.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

W = "adapter_model.safetensors"
C = "adapter_config.json"
PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / C).read_text())
    cfg.update(changes)
    (d / C).write_text(json.dumps(cfg))


def _edit_tensors(d: Path, fn) -> None:
    t = load_file(str(d / W))
    fn(t)
    save_file(t, str(d / W))


def pickle_bin(d, outside):
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    return "pickle_file"


def pickle_pt_only(d, outside):
    (d / W).unlink()
    (d / "adapter_model.pt").write_bytes(pickle.dumps({"x": 1}))
    return "pickle_file"


def wrong_shape_in(d, outside):
    def f(t):
        a = t[f"{PREFIX}.lora_A.weight"]
        t[f"{PREFIX}.lora_A.weight"] = np.zeros((a.shape[0], a.shape[1] + 1), a.dtype)
    _edit_tensors(d, f)
    return "shape_mismatch"


def wrong_shape_rank(d, outside):
    def f(t):
        b = t[f"{PREFIX}.lora_B.weight"]
        t[f"{PREFIX}.lora_B.weight"] = np.zeros((b.shape[0], b.shape[1] + 2), b.dtype)
    _edit_tensors(d, f)
    return "shape_mismatch"


def module_base_lacks(d, outside):
    def f(t):
        for ab in "AB":
            t[f"base_model.model.model.layers.7.self_attn.q_proj.lora_{ab}.weight"] = \
                t[f"{PREFIX}.lora_{ab}.weight"].copy()
    _edit_tensors(d, f)
    return "unknown_module"


def target_base_lacks(d, outside):
    cfg = json.loads((d / C).read_text())
    _edit_config(d, target_modules=cfg["target_modules"] + ["cross_attn"])
    return "unknown_module"


def non_lora_tensor(d, outside):
    def f(t):
        t["base_model.model.lm_head.weight"] = np.zeros((4, 4), np.float32)
    _edit_tensors(d, f)
    return "unexpected_tensor"


def target_not_allowed(d, outside):
    def f(t):
        t["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)
        t["base_model.model.lm_head.lora_B.weight"] = np.zeros((320, 4), np.float32)
    _edit_tensors(d, f)
    return "target_not_allowed"


def missing_b(d, outside):
    _edit_tensors(d, lambda t: t.pop(f"{PREFIX}.lora_B.weight"))
    return "missing_tensor"


def int_dtype(d, outside):
    def f(t):
        a = t[f"{PREFIX}.lora_A.weight"]
        t[f"{PREFIX}.lora_A.weight"] = np.zeros(a.shape, np.int32)
    _edit_tensors(d, f)
    return "bad_dtype"


def rank_above_max(d, outside):
    _edit_config(d, r=32)  # config says 32 > max_rank 16; refused before tensors are even read
    return "rank_too_large"


def oversize(d, outside):
    with open(d / W, "ab") as fh:  # only size matters for this check (it runs before parsing)
        fh.write(b"\0" * 12_000_000)
    return "too_large"


def symlink_outside(d, outside):
    real = outside / "elsewhere.safetensors"
    os.replace(d / W, real)
    os.symlink(real, d / W)
    return "symlink"


def symlink_extra(d, outside):
    os.symlink("/etc/passwd", d / "notes.txt")
    return "symlink"


def truncated(d, outside):
    data = (d / W).read_bytes()
    (d / W).write_bytes(data[: len(data) // 2])
    return "corrupt_safetensors"


def truncated_header(d, outside):
    data = (d / W).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    (d / W).write_bytes(data[: 8 + n // 2])
    return "corrupt_safetensors"


def corrupt_header_len(d, outside):
    data = bytearray((d / W).read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    (d / W).write_bytes(bytes(data))
    return "corrupt_safetensors"


def corrupt_header_json(d, outside):
    data = bytearray((d / W).read_bytes())
    data[8:12] = b"\xff[[["
    (d / W).write_bytes(bytes(data))
    return "corrupt_safetensors"


def tiny_file(d, outside):
    (d / W).write_bytes(b"abc")
    return "corrupt_safetensors"


def trailing_garbage(d, outside):
    with open(d / W, "ab") as fh:
        fh.write(b"junk")
    return "corrupt_safetensors"


def other_base_model(d, outside):
    _edit_config(d, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    return "base_model_mismatch"


def dora(d, outside):
    _edit_config(d, use_dora=True)
    return "dora"


def not_lora(d, outside):
    _edit_config(d, peft_type="LOHA")
    return "not_lora"


def bias_all(d, outside):
    _edit_config(d, bias="all")
    return "bias"


def modules_to_save(d, outside):
    _edit_config(d, modules_to_save=["lm_head"])
    return "unsupported_option"


def pissa_init(d, outside):
    _edit_config(d, init_lora_weights="pissa")  # trained against a rewritten base: wrong on ours
    return "unsupported_option"


def unknown_option_set(d, outside):
    _edit_config(d, use_some_future_variant=True)
    return "unsupported_option"


def config_not_json(d, outside):
    (d / C).write_text("{not json")
    return "bad_config"


def config_missing(d, outside):
    (d / C).unlink()
    return "missing_file"


def weights_fifo(d, outside):
    (d / W).unlink()
    os.mkfifo(d / W)
    return "not_regular_file"


HOSTILE = [pickle_bin, pickle_pt_only, wrong_shape_in, wrong_shape_rank, module_base_lacks, target_base_lacks,
           non_lora_tensor, target_not_allowed, missing_b, int_dtype, rank_above_max, oversize, symlink_outside,
           symlink_extra, truncated, truncated_header, corrupt_header_len, corrupt_header_json, tiny_file,
           trailing_garbage, other_base_model, dora, not_lora, bias_all, modules_to_save, pissa_init,
           unknown_option_set, config_not_json,
           config_missing, weights_fifo]
