"""Start and stop the scale-out stack (make scaleout N=3 / make stop): N TorchServes of the
demo archive (model_store/loraplex) on the demo's redis-server (127.0.0.1:6399) and adapter
store (var/adapters), nginx on 127.0.0.1:8090 hashing X-Tenant-ID onto them. Instance i
listens on 8100+10i (inference), +1 (management), +2 (metrics). The services live in
`loraplex_testing.services` (ScaleOut, Nginx); this is their CLI.

Usage: python scripts/nginx/scaleout.py {start,stop,reload} [-n N] [--var DIR]
`reload` re-renders nginx's config with the instances' current tokens (after a token renewal).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraplex_testing.services import (HASH_BY_TENANT, ROOT, SCALEOUT_NGINX_PORT, Nginx, TorchServe,
                                       start_scaleout_demo, stop_scaleout_demo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="start/stop N torchserves behind a tenant-hashing nginx")
    p.add_argument("action", choices=["start", "stop", "reload"])
    p.add_argument("-n", type=int, default=3, help="instances (start)")
    p.add_argument("--var", type=Path, default=ROOT / "var")
    args = p.parse_args(argv)
    var = args.var.resolve()
    var.mkdir(parents=True, exist_ok=True)
    if args.action == "start":
        if not (ROOT / "model_store" / "loraplex" / "MAR-INF").exists():
            raise SystemExit("no archive in model_store/loraplex: run `make archive` first")
        stack = start_scaleout_demo(var, args.n)
        front = stack.fronts["hash"]
        for i, ts in enumerate(stack.instances):
            print(f"instance {i}: {ts.inference_url} (management {ts.management_url}, keys {ts.workdir}/key_file.json)")
        print(f"nginx (hash $http_x_tenant_id consistent): {front.url}/predictions/loraplex; "
              f"client key in {front.workdir}/key_file.json")
    elif args.action == "reload":
        root = var / "scaleout"
        instances = [TorchServe(d, ROOT / "model_store") for d in sorted(root.glob("ts*"))]
        for ts in instances:  # the ports the running instances were started with
            ts.ports = _ports(ts.workdir / "config.properties")
        Nginx(root / "nginx-hash", SCALEOUT_NGINX_PORT, instances, balance=HASH_BY_TENANT).reload()
        print("nginx reloaded with the instances' current tokens")
    else:
        stop_scaleout_demo(var)
    return 0


def _ports(config: Path) -> tuple[int, int, int]:
    props = dict(line.split("=", 1) for line in config.read_text().splitlines() if "=" in line)
    return tuple(int(props[k].rsplit(":", 1)[1]) for k in ("inference_address", "management_address",
                                                            "metrics_address"))


if __name__ == "__main__":
    sys.exit(main())
