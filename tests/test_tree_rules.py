"""Rules of the source tree: tests and benchmarks import the installed packages (handler,
tenant_registry, loraplex_common, loraplex_testing), no file reaches another through a `sys.path`
edit, and test modules have unique basenames."""
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


def test_test_files_have_unique_basenames():
    """pytest's default import mode needs one basename per test module in folders without
    __init__.py; a second test_x.py elsewhere stops the whole collection."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
