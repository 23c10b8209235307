"""Small assertions helpers shared by the registry tests."""
from __future__ import annotations

from pathlib import Path


def keys_under(raw_redis, prefix: str) -> list[bytes]:
    return list(raw_redis.scan_iter(match=f"{prefix}:*"))


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*")] if root.exists() else []
