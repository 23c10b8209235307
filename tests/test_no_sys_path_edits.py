"""Tests and benchmarks import the installed packages (handler, tenant_registry, loraplex_common,
loraplex_testing); no file reaches another through a `sys.path` edit."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRS = ("handler", "tenant_registry", "loraplex_common", "loraplex_testing", "bench", "tests", "demo", "scripts",
        "model_store")


def test_no_file_edits_sys_path():
    needle = "sys.path." + "insert"  # spelt apart so this file does not match itself
    offenders = [str(p.relative_to(ROOT)) for d in DIRS for p in (ROOT / d).rglob("*.py")
                 if needle in p.read_text(errors="replace")]
    assert offenders == []
