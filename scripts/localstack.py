"""Start and stop the demo's redis-server and torchserve (make demo / make stop).

The services live in `loraplex_testing.services`; this is their CLI.
Usage: python scripts/localstack.py {start,stop} [--var DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraplex_testing.services import ROOT, start_demo_stack, stop_demo_stack


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="start/stop the demo's redis-server and torchserve")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--var", type=Path, default=ROOT / "var")
    args = p.parse_args(argv)
    var = args.var.resolve()
    var.mkdir(parents=True, exist_ok=True)
    if args.action == "start":
        start_demo_stack(var)
    else:
        stop_demo_stack(var)
    return 0


if __name__ == "__main__":
    sys.exit(main())
