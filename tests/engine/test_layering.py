"""The engine's import graph points one way: multilora -> kernels -> lora_ops (pure torch), and
the engine reads no LORAPLEX_* environment variable (settings are passed in: EngineSettings)."""
from __future__ import annotations

import ast
from pathlib import Path

import handler.engine

ENGINE = Path(handler.engine.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute names of the handler.engine modules `path` imports (lazily or not)."""
    package = ".".join(("handler", "engine", *path.relative_to(ENGINE).parent.parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("handler.engine")}


def test_kernels_and_lora_ops_never_import_multilora():
    for path in [*(ENGINE / "kernels").glob("*.py"), ENGINE / "lora_ops.py"]:
        bad = {m for m in _imports(path) if m.startswith("handler.engine.multilora")}
        assert not bad, f"{path.name} imports {bad}"
    assert not _imports(ENGINE / "lora_ops.py")


def test_no_environment_reads_in_the_engine():
    for path in ENGINE.rglob("*.py"):
        text = path.read_text()
        assert "LORAPLEX_" not in text.replace("`LORAPLEX_*`", ""), path
        if "os.environ" in text or "getenv" in text:
            assert path.name == "triton_lora.py" and text.count("os.environ") == 1, path  # TRITON_INTERPRET, once
