"""Start and stop the demo's redis-server and torchserve (make demo / make stop).

The service classes live in `loraplex_testing.services`; this is their CLI.
Usage: python scripts/localstack.py {start,stop} [--var DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraplex_testing.services import ROOT, RedisServer, TorchServe, stop_pid_file, wait_port

# -- CLI used by the Makefile ------------------------------------------------------------

DEMO_REDIS_PORT = 6399


def _cli_start(var: Path) -> None:
    redis = RedisServer(DEMO_REDIS_PORT, var / "redis", persistent=True)
    if not wait_port(DEMO_REDIS_PORT, 0.2):
        redis.start(detach=True)
        (var / "redis.pid").write_text(str(redis.proc.pid))
    env = {"LORAPLEX_REDIS_URL": redis.url, "LORAPLEX_ADAPTER_STORE": str(var / "adapters")}
    ts = TorchServe(var / "torchserve", ROOT / "model_store", ports=(8080, 8081, 8082), env=env)
    if wait_port(8080, 0.2):
        print("torchserve already listening on 127.0.0.1:8080")
        return
    ts.start(detach=True)
    print(f"torchserve ready: {ts.inference_url} (keys in {ts.workdir}/key_file.json)")


def _cli_stop(var: Path) -> None:
    stop_pid_file(var / "torchserve" / "torchserve.pid")
    stop_pid_file(var / "redis.pid")
    print("stopped torchserve and redis-server")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="start/stop the demo's redis-server and torchserve")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--var", type=Path, default=ROOT / "var")
    args = p.parse_args(argv)
    args.var.mkdir(parents=True, exist_ok=True)
    {"start": _cli_start, "stop": _cli_stop}[args.action](args.var.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
