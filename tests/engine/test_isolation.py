"""The engine knows nothing of tenants, Redis or TorchServe."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_imports_no_tenant_redis_or_torchserve_code():
    code = ("import sys; import handler.engine, handler.engine.multilora, handler.engine.peft_engine, "
            "handler.engine.generation; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tenant_registry', 'redis', 'ts')); "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_engine_never_uses_torch_load():
    for path in (ROOT / "handler" / "engine").rglob("*.py"):
        assert "torch.load(" not in path.read_text(), path
