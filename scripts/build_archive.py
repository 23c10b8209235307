"""Build the TorchServe model archive (make archive). The builder lives in
`loraplex_testing.archive`; this is its CLI.

Usage: python scripts/build_archive.py --base-model DIR [--store model_store] [--name loraplex]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraplex_testing.archive import ROOT, build_archive


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="build the loraplex TorchServe model archive (no-archive format)")
    p.add_argument("--base-model", type=Path, required=True)
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--name", default="loraplex")
    p.add_argument("--config-file", type=Path, default=ROOT / "model-config.yaml")
    args = p.parse_args(argv)
    print(build_archive(args.base_model, args.store, name=args.name, config_file=args.config_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
