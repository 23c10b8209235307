"""Engine-test fixtures: adapters of every supported flavour for the shared
tiny Llama, and PEFT reference models (PEFT is the oracle)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex_testing.models import ALL_TARGETS, make_lora_with_config, make_random_lora

# name -> make_random_lora kwargs: ranks 4/8/16/64, varied alphas, rslora, different target sets
ADAPTER_SPECS = {
    "r4": dict(r=4, alpha=8, seed=21),
    "r8qv": dict(r=8, alpha=32, seed=22, targets=("q_proj", "v_proj")),
    "r16rs": dict(r=16, alpha=16, seed=23, use_rslora=True, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")),
    "r64": dict(r=64, alpha=128, seed=24),
    "r16mlp": dict(r=16, alpha=8, seed=25, targets=("gate_proj", "up_proj", "down_proj")),
    "r8rs": dict(r=8, alpha=4, seed=26, use_rslora=True),
}


@pytest.fixture(scope="session")
def engine_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-adapters")
    out = {name: make_random_lora(tiny_model_dir, root / name, **kw) for name, kw in ADAPTER_SPECS.items()}
    out["patterned"] = make_lora_with_config(tiny_model_dir, root / "patterned", seed=27, r=8, lora_alpha=16,
                                             target_modules=list(ALL_TARGETS),
                                             rank_pattern={"q_proj": 4, "down_proj": 12},
                                             alpha_pattern={"v_proj": 64, "layers.1.mlp.up_proj": 3})
    return out


def load_base(model_dir: Path, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()


def load_peft(model_dir: Path, adapters: dict[str, Path], dtype=torch.float32, device="cpu"):
    """A PeftModel holding every given adapter (the oracle)."""
    from peft import PeftModel

    items = list(adapters.items())
    pm = PeftModel.from_pretrained(load_base(model_dir, dtype, device), str(items[0][1]), adapter_name=items[0][0])
    for name, path in items[1:]:
        pm.load_adapter(str(path), adapter_name=name)
    return pm.eval()


@pytest.fixture(scope="session")
def peft_oracle(tiny_model_dir, engine_adapters):
    return load_peft(tiny_model_dir, engine_adapters)


@pytest.fixture(scope="session")
def base_model(tiny_model_dir):
    return load_base(tiny_model_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def peft_row_logits(pm, name: str | None, ids: torch.Tensor) -> torch.Tensor:
    """PEFT's single-adapter forward on one row (base model when name is None)."""
    with torch.no_grad():
        if name is None:
            with pm.disable_adapter():
                return pm(input_ids=ids[None]).logits[0]
        pm.set_adapter(name)
        return pm(input_ids=ids[None]).logits[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())
