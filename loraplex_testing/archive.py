"""Build the TorchServe model archive (no-archive format: a plain directory in
the model store) from a base model dir + the handler entry + model-config.yaml.

Why no-archive: the base model is hundreds of MB; a .mar would be zipped and
unzipped on every TorchServe start for nothing. `--extra-files DIR` copies the
base model's files flat into the model dir, where `initialize` finds them.

Used by `scripts/build_archive.py` (make archive), the demo, the end-to-end
tests and the soak benchmark.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_archive(base_model_dir: Path, store: Path, *, name: str = "loraplex",
                  config_file: Path = ROOT / "model-config.yaml", version: str = "1.0") -> Path:
    base_model_dir, store = Path(base_model_dir).resolve(), Path(store).resolve()
    if not (base_model_dir / "config.json").exists():
        raise SystemExit(f"{base_model_dir} is not a model dir (no config.json)")
    store.mkdir(parents=True, exist_ok=True)
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    cmd = [str(archiver), "--model-name", name, "--version", version,
           "--handler", str(ROOT / "handler" / "ts_entry.py"), "--config-file", str(config_file),
           "--extra-files", str(base_model_dir), "--archive-format", "no-archive",
           "--export-path", str(store), "--force"]
    subprocess.run(cmd, check=True)
    out = store / name
    if not (out / "MAR-INF" / "MANIFEST.json").exists():
        raise SystemExit(f"torch-model-archiver did not produce {out}")
    return out
