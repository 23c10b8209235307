"""Slot-pool multi-LoRA engine (`engine: multilora`): every tenant in one forward pass."""
from .engine import MultiLoraEngine
from .layer import MultiLoraLinear
from .model import BASE_MARKER, MultiLoraModel

__all__ = ["MultiLoraEngine", "MultiLoraLinear", "MultiLoraModel", "BASE_MARKER"]
