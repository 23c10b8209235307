"""Typed errors shared by every engine.

Why a module of its own: the handler maps these to HTTP answers (400 for a bad
adapter, 503 for a full pool, 404 for an unknown name) without caring which
engine raised them, so both engines raise exactly these types.
All are `ValueError` subclasses so callers that only know PEFT's habit of
raising `ValueError` still catch them.
"""
from __future__ import annotations


class EngineError(ValueError):
    """Base of every error an engine raises on purpose."""


class AdapterFormatError(EngineError):
    """The adapter directory is unreadable or its files contradict each other
    (missing/unexpected tensors, shape mismatches, bad config)."""


class UnsupportedAdapter(EngineError):
    """A well-formed adapter using a feature this engine refuses (DoRA, bias,
    non-LoRA peft_type, a rank above the pool's maximum, untargetable modules)."""


class NoFreeSlot(EngineError):
    """Every adapter slot is taken; delete one first."""


class AdapterAlreadyLoaded(EngineError):
    """An adapter with this name is resident; delete it first (names are never silently replaced)."""


class AdapterNotLoaded(EngineError, KeyError):
    """The named adapter is not resident."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class BatchShapeError(EngineError):
    """The per-row adapter list does not match the batch (e.g. beams multiplied the rows)."""


class CacheFull(EngineError):
    """No free KV row now (`api.RowStepper.add`): the row can run once another finishes or is
    cancelled, so the caller keeps it waiting."""


class RowTooLong(EngineError):
    """``len(prompt) + max_new_tokens`` exceeds the stepper's ``max_len``: the row can never fit in a
    KV row, however long it waits."""
