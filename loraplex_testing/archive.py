"""Build the TorchServe model archive (no-archive format: a plain directory in
the model store) from a base model dir + the handler entry + model-config.yaml.

Why no-archive: the base model is hundreds of MB; a .mar would be zipped and
unzipped on every TorchServe start for nothing. `--extra-files DIR` copies the
base model's files flat into the model dir, where `initialize` finds them.

Used by `scripts/build_archive.py` (make archive), the demo, the end-to-end
tests and the benchmarks.

`scheduler=` derives the archive's model-config from `config_file` for one kind of
serving, so tests and bench/serve_bench.py can start both side by side:
- "static": batch to completion. TorchServe batches (no asyncCommunication,
  batchSize 8, maxBatchDelay 20 ms); handler `scheduler: static`.
- "continuous": the per-step scheduler. asyncCommunication on, batchSize 1 (each
  request reaches the worker as it arrives); handler `scheduler: continuous`.
None (the default) archives `config_file` as it is.

TorchServe 0.12 cannot batch an asynchronous worker: with asyncCommunication and
batchSize > 1 its frontend (AsyncBatchAggregator.getRequest) removes jobs from the map
it iterates, throws ConcurrentModificationException once two requests are queued, and
restarts the worker, losing them. So `build_archive` refuses that combination, and
`with_batching` sets TorchServe batching only on a synchronous config.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

_SERVING = {
    "static": {"asyncCommunication": False, "batchSize": 8, "maxBatchDelay": 20},
    "continuous": {"asyncCommunication": True, "batchSize": 1},
}


def serving_config(config: dict, scheduler: str) -> dict:
    """`config` (a parsed model-config.yaml) set up for one scheduler (see the module docstring)."""
    if scheduler not in _SERVING:
        raise ValueError(f"scheduler must be one of {sorted(_SERVING)}, got {scheduler!r}")
    out = {k: v for k, v in config.items() if k not in ("asyncCommunication", "maxBatchDelay")}
    out.update(_SERVING[scheduler])
    if not out["asyncCommunication"]:
        del out["asyncCommunication"]
    out["handler"] = {**(config.get("handler") or {}), "scheduler": scheduler}
    return out


def with_batching(config: dict, batch_size: int, max_batch_delay_ms: int) -> dict:
    """`config` with TorchServe batching (batchSize, maxBatchDelay) if it is synchronous; an
    asynchronous one (the per-step scheduler) is left at one request a message (module docstring)."""
    if config.get("asyncCommunication"):
        return dict(config)
    return {**config, "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms}


def check_serving(config: dict) -> None:
    """Refuse what TorchServe 0.12 cannot serve: asyncCommunication with batchSize > 1."""
    if config.get("asyncCommunication") and int(config.get("batchSize", 1)) != 1:
        raise ValueError(f"asyncCommunication needs batchSize 1 (got {config['batchSize']}): TorchServe 0.12's "
                         "frontend fails on batches of an asynchronous worker; see loraplex_testing/archive.py")


def build_archive(base_model_dir: Path, store: Path, *, name: str = "loraplex",
                  config_file: Path = ROOT / "model-config.yaml", version: str = "1.0",
                  scheduler: str | None = None) -> Path:
    base_model_dir, store = Path(base_model_dir).resolve(), Path(store).resolve()
    if not (base_model_dir / "config.json").exists():
        raise SystemExit(f"{base_model_dir} is not a model dir (no config.json)")
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraplex-archive-") as tmp:
        config = yaml.safe_load(Path(config_file).read_text()) or {}
        if scheduler is not None:
            config = serving_config(config, scheduler)
            config_file = Path(tmp) / "model-config.yaml"
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        check_serving(config)
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
