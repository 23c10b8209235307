from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Test models are tiny: one thread is faster than two, and immune to the
# oversubscription slowdowns seen when other work shares the machine's 2 cores.
torch.set_num_threads(1)

# Where triton is installed but no GPU is, the kernel tests run in Triton's CPU interpreter, which
# must be switched on before anything imports triton (engine tests may import it first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loraplex_testing.models import make_random_lora, make_tiny_llama
from loraplex_testing.services import redis_server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama model dir shared by the whole session (read-only by convention)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A few PEFT LoRA adapters for the tiny model, with different ranks/targets."""
    root = tmp_path_factory.mktemp("tiny-adapters")
    return {
        "a": make_random_lora(tiny_model_dir, root / "a", r=4, alpha=8, seed=11),
        "b": make_random_lora(tiny_model_dir, root / "b", r=8, alpha=32, seed=12,
                              targets=("q_proj", "v_proj")),
        "c": make_random_lora(tiny_model_dir, root / "c", r=16, alpha=16, seed=13, use_rslora=True,
                              targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")),
    }


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A real redis-server private to this test session."""
    with redis_server() as (url, _proc):
        yield url
