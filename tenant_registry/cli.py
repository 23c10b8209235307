"""tenantctl: the operator's command line for the tenant registry.

    tenantctl [global options] onboard TENANT ADAPTER_DIR [--task TASK] [--examples FILE]
    tenantctl [global options] list | show TENANT [--task TASK] | disable TENANT | enable TENANT
    tenantctl [global options] remove TENANT [--task TASK]
    tenantctl [global options] rollback TENANT [--to VERSION] [--task TASK]
    tenantctl [global options] rotate-key TENANT
    tenantctl [global options] pin TENANT | unpin TENANT
    tenantctl [global options] export [FILE|-]
    tenantctl [global options] import FILE [--replace]
    tenantctl [global options] status [TENANT]
    tenantctl [global options] split TENANT [--task TASK] [vN=WEIGHT ...] [--clear]
    tenantctl [global options] chain TENANT [LINK ... --threshold T | --clear]
    tenantctl [global options] router TENANT [header|classify] [--task TASK --examples FILE]

Tasks: a tenant owns named tasks, each its own adapter line with versions, history and rollback
(`onboard acme ./adapter --task summarize`). `--task` defaults to `default`, the line every tenant had
before tasks existed (what a request without a task gets). `remove TENANT` removes the whole tenant;
`remove TENANT --task T` only that task (its last task takes the tenant with it). `disable`/`enable`,
keys and pins are the tenant's, for all its tasks (a pin keeps the default task's current adapter).
`show TENANT` and `status TENANT` list the tenant's tasks. Version numbers are one sequence per tenant
across its tasks (acme@v1, acme:summarize@v2, ...).

Task router: `router TENANT classify` lets the worker's router pick the task of a request that names
none, from each task's example prompts (`onboard ... --examples FILE` or `router TENANT --task T
--examples FILE`: one prompt per line, or a JSON list; they replace the task's earlier ones);
`router TENANT header` (the default) serves such requests with the default task. Each change is one
policy write (one event every worker follows); `router TENANT` shows the router and the examples.

Tenant keys: the first `onboard` of a tenant (one without a key) issues its key and prints it once
("tenant_key" in --json output; null when no key was issued). Only a salted digest is stored, so the
key cannot be shown again: `rotate-key` issues a new one (the old key stops working at once).

Pinning: `pin` keeps the tenant's current adapter resident on every worker (device slots and host
tier, loaded at worker start and whenever it is missing); at most `max_pinned_adapters` tenants may
be pinned: `pin` beyond that is refused (exit 1) naming the pinned ones. `unpin` lets it be evicted.

Fallback chain: `chain acme summarize@v3 default base --threshold -1.5` sets the tenant's confidence
fallback chain (links "<task>", "<task>@v<N>", ending with "base"; at most `max_fanout_rows` links):
a request naming no task, pin or compare runs every link as a row of one batch and is answered by the
first link whose mean token log-probability reaches the threshold (else base). `--clear` ends it;
`chain acme` alone shows it. One registry change, which every worker picks up at once. (A threshold
in exponent form needs the `=`: `--threshold=-1e-3`, or argparse takes it for an option.)

A/B splits: `split acme --task default v3=90 v4=10` serves the task's requests from v3 and v4 in that
ratio (weights are relative; every version must be in the task's history and its files intact in the
store); a request with X-User-ID always gets the same version while the split is unchanged.
`split acme --task default --clear` ends that task's split, `split acme --clear` every task's; `split
acme` shows them (so does `show`). A `rollback` of the task ends its split too. Each is one registry
change, which every worker picks up at once.

Backup: `export` writes every tenant's record, history, status, key digest and version counter as one
JSON document (to FILE, or stdout for `-` or no FILE); `import` restores it, refusing tenants that
already exist unless --replace. Records point into the adapter store: back up the store directory
alongside the export (see tenant_registry/backup.py).

Global options (also accepted after the sub-command):
  --model-config PATH   the TorchServe model-config.yaml whose `handler:` section holds the settings
                        (default: env LORAPLEX_MODEL_CONFIG, else ./model-config.yaml if it exists)
  --redis-url URL       (env LORAPLEX_REDIS_URL)       --store DIR      adapter store root
  --base-model-dir DIR  base model to validate against  --json           one JSON document on stdout
  --management-url URL, --model-name NAME, --token TOKEN (env LORAPLEX_TS_TOKEN), --key-file PATH
Settings precedence: defaults < model-config.yaml < env LORAPLEX_* < command-line flags (the one
loader, loraplex_common/config.py). Relative paths in the model config (and the defaults of the
path settings) are relative to the config file's directory; relative flags to the current directory.

Which base model and store (so `tenantctl onboard acme ./acme-adapter` works in the project dir after
`make demo`): the store is `adapter_store`; the base model is `base_model_dir`, or, when that is empty
(the workers then load the TorchServe model dir), the archive `<model_store>/<model_name>` the workers
load (make archive copies the base model into it). `onboard` refuses a store that cannot be the one
the workers read: a relative default with no model config to anchor it, or a store that holds none of
the registered tenants' files. `status` reads the management token from --token, LORAPLEX_TS_TOKEN,
or the key file (--key-file, else `management_key_file`: TorchServe writes key_file.json in the
directory it is started from; the demo's is var/torchserve/key_file.json).

Exit codes (scripts may rely on them):
  0  ok
  1  any other error (e.g. a concurrent change won, TorchServe refused the token)
  2  usage or configuration error (bad arguments, bad config key, invalid tenant id)
  3  not found (tenant, version, or the TorchServe model)
  4  adapter invalid (refused at onboarding, or a stored copy failed verification)
     also: `import` of a backup file that is unreadable or not valid (nothing written)
     (`import` over existing tenants without --replace is 1, nothing written)
  5  registry unavailable (Redis down or timing out)
  6  TorchServe unreachable (status)

With --json, stdout carries exactly one JSON document: the result, or {"error": {"type", "message",
"code", "exit_code"}} on failure. Human-readable messages go to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

from loraplex_common.config import (MODEL_CONFIG_FILE, LoraplexConfig, env_value, find_model_config,
                                    settings_from_env)
from .errors import (AdapterInvalid, ConfigError, InvalidTaskName, InvalidTenantId, PolicyInvalid, RegistryError,
                     RegistryUnavailable, TenantNotFound, VersionNotFound)
from .backup import BackupInvalid, export_registry, import_registry
from .onboarding import ensure_key, onboard, parse_examples, rotate_key, router_change, router_doc, with_examples
from .ids import DEFAULT_TASK, format_link, parse_link, parse_task_adapter_id, validate_task
from .registry import TenantRegistry, rollback_version
from .schema import SplitArm, TenantPolicy, TenantRecord, parse_arms
from .store import AdapterStore, open_store
from .validate import BaseModelSpec

EXIT_OK, EXIT_OTHER, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INVALID, EXIT_UNAVAILABLE, EXIT_TS_UNREACHABLE = 0, 1, 2, 3, 4, 5, 6
TS_TIMEOUT_S = 5.0


class TorchServeUnreachable(RegistryError):
    """The management API did not answer (connection refused, timeout, 5xx)."""


class TorchServeRefused(RegistryError):
    """The management API answered with an error (401/403: bad or missing token)."""


class ModelNotFound(RegistryError):
    """The management API does not know the model (404)."""


def _exit_code(e: BaseException) -> int:
    if isinstance(e, (ConfigError, InvalidTenantId, InvalidTaskName, PolicyInvalid)):
        return EXIT_USAGE
    if isinstance(e, (TenantNotFound, VersionNotFound, ModelNotFound)):
        return EXIT_NOT_FOUND
    if isinstance(e, (AdapterInvalid, BackupInvalid)):
        return EXIT_INVALID
    if isinstance(e, RegistryUnavailable):
        return EXIT_UNAVAILABLE
    if isinstance(e, TorchServeUnreachable):
        return EXIT_TS_UNREACHABLE
    return EXIT_OTHER


# ---------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS  # defaults are applied once in main(), so a sub-parser never resets a global flag
    p.add_argument("--model-config", metavar="PATH", default=s,
                   help="TorchServe model-config.yaml (default: env LORAPLEX_MODEL_CONFIG, else ./model-config.yaml)")
    p.add_argument("--redis-url", default=s, help="Redis URL (env LORAPLEX_REDIS_URL)")
    p.add_argument("--store", metavar="DIR", default=s, help="adapter store root: a directory or s3://bucket/prefix")
    p.add_argument("--base-model-dir", metavar="DIR", default=s, help="base model to validate adapters against")
    p.add_argument("--management-url", default=s, help="TorchServe management API URL")
    p.add_argument("--model-name", default=s, help="TorchServe model name")
    p.add_argument("--token", default=s, help="TorchServe management token (env LORAPLEX_TS_TOKEN)")
    p.add_argument("--key-file", metavar="PATH", default=s,
                   help="TorchServe key_file.json holding the management key (config key management_key_file)")
    p.add_argument("--json", action="store_true", default=s, help="print one JSON document on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tenantctl", description="Manage loraplex tenants and their LoRA adapters.")
    _common(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, tenant: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        _common(p)
        if tenant:
            p.add_argument("tenant", metavar="TENANT")
        return p

    def task(p: argparse.ArgumentParser, default: str | None = DEFAULT_TASK, what: str = "") -> argparse.ArgumentParser:
        p.add_argument("--task", default=default, metavar="TASK",
                       help=what or f"the tenant's task (adapter line); default {default!r}")
        return p

    onboard_p = task(add("onboard", "validate an adapter and register it as the next version of the tenant's task"))
    onboard_p.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    onboard_p.add_argument("--examples", metavar="FILE", help="the task's example prompts for the task router "
                           "(one per line, or a JSON list); replaces the task's earlier ones")
    add("list", "list tenants (one row per task)", tenant=False)
    task(add("show", "show a tenant's tasks, and one task's current record and history"))
    add("disable", "disable a tenant (all its tasks; its requests are refused)")
    add("enable", "re-enable a tenant")
    task(add("remove", "remove a tenant (records, history, stored files), or only one of its tasks"), None,
         "remove only this task (its versions and files); without it the whole tenant goes")
    task(add("rollback", "make an older version of a task current")).add_argument(
        "--to", type=int, dest="to_version", metavar="VERSION")
    add("rotate-key", "issue a new tenant key (printed once); the old key stops working")
    add("pin", "keep the tenant's current adapter resident on every worker (at most max_pinned_adapters)")
    add("unpin", "let the tenant's adapter be evicted again")
    add("export", "back up the whole registry as one JSON document", tenant=False).add_argument(
        "file", metavar="FILE", nargs="?", default="-", help="output file (default or '-': stdout)")
    imp = add("import", "restore a backup made by export", tenant=False)
    imp.add_argument("file", metavar="FILE", help="backup file ('-': stdin)")
    imp.add_argument("--replace", action="store_true", help="overwrite tenants that already exist")
    split = task(add("split", "set, show or clear the tenant's A/B splits between versions of a task"), None,
                 "the task whose split this is (default: 'default' to set; every task to show or --clear)")
    split.add_argument("arms", metavar="vN=WEIGHT", nargs="*", help="the split's arms, e.g. v3=90 v4=10")
    split.add_argument("--clear", action="store_true", help="end the split (of --task, else of every task)")
    add("status", "ask TorchServe which adapters each worker holds; with TENANT, list the tenant's tasks",
        tenant=False).add_argument("tenant", metavar="TENANT", nargs="?")
    chain = add("chain", "set, show or clear the tenant's confidence fallback chain")
    chain.add_argument("links", metavar="LINK", nargs="*", help="'<task>' or '<task>@v<N>' in order, ending with 'base'")
    chain.add_argument("--threshold", type=float, metavar="T", help="mean token log-prob a link's answer must reach")
    chain.add_argument("--clear", action="store_true", help="end the chain (requests are served by their task again)")
    router = task(add("router", "set or show the tenant's task router (header or classify) and a task's example "
                               "prompts"), None, "the task whose --examples these are")
    router.add_argument("mode", metavar="MODE", nargs="?", choices=("header", "classify"),
                        help="header: a request without a task gets the default task; classify: the router picks")
    router.add_argument("--examples", metavar="FILE", help="the task's example prompts (one per line, or a JSON list)")
    router.add_argument("--unknown-task", choices=("reject", "default", "worker"),
                        help="a request naming a task the tenant lacks: reject (404), default (its default task "
                             "serves it) or worker (the worker's unknown_task_policy; the initial setting)")
    return parser


# ---------------------------------------------------------------------------- output
class _Out:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, doc: dict[str, Any], text: str) -> None:
        if self.as_json:
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            print(text)

    def error(self, e: BaseException, code: int) -> None:
        msg = str(e) or type(e).__name__
        print(f"tenantctl: error: {msg}", file=sys.stderr)
        if self.as_json:
            print(json.dumps({"error": {"type": type(e).__name__, "message": msg,
                                        "code": getattr(e, "code", None), "exit_code": code}}, indent=2))


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _record_text(r: TenantRecord) -> str:
    return "\n".join([
        f"tenant:      {r.tenant_id}", f"task:        {r.task}", f"adapter:     {r.adapter_id}",
        f"status:      {r.status}",
        f"version:     {r.version}", f"rank/alpha:  {r.rank}/{r.alpha:g}{' (rslora)' if r.use_rslora else ''}",
        f"targets:     {', '.join(r.target_modules)}", f"base model:  {r.base_model}",
        f"path:        {r.path}", f"sha256:      {r.sha256}", f"bytes:       {r.nbytes}",
        f"created:     {_ts(r.created_at)}", f"updated:     {_ts(r.updated_at)}"])


def _table(rows: list[list[str]], header: list[str]) -> str:
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols)


# ---------------------------------------------------------------------------- commands
def _registry(cfg: LoraplexConfig) -> TenantRegistry:
    return TenantRegistry(cfg.redis_url, cfg.redis_prefix)


def _store(cfg: LoraplexConfig) -> AdapterStore:
    return open_store(cfg.adapter_store, cfg.adapter_store_endpoint)


def base_model_dir(cfg: LoraplexConfig) -> Path:
    """The base model adapters are validated against: `base_model_dir`, or, when it is empty (workers
    load the TorchServe model dir), the archive `<model_store>/<model_name>` the workers load."""
    if cfg.base_model_dir:
        return Path(cfg.base_model_dir)
    archive = Path(cfg.model_store) / cfg.model_name
    if not (archive / "config.json").is_file():
        raise ConfigError(f"onboard needs the base model the workers load: base_model_dir is empty and the model "
                          f"archive {str(archive)!r} (model_store/model_name) has no config.json; run `make archive` "
                          "or pass --base-model-dir (or --model-config for the model config that names them)",
                          key="base_model_dir")
    return archive


def check_store(reg: TenantRegistry, store: AdapterStore, *, anchored: bool) -> None:
    """Refuse a store that cannot be the one the workers read (ConfigError, nothing written).

    `anchored` is False when adapter_store is a relative default that no model config or flag fixed:
    it would land under whatever directory tenantctl runs in. And a store holding the files of none
    of the registered tenants' current versions is another directory than the one onboarding wrote to
    so far (the workers would answer those tenants with the base model: 'stored file unreadable')."""
    if not anchored:
        raise ConfigError(f"adapter store {str(store.root)!r} is relative and no model config anchors it (no "
                          "./model-config.yaml, LORAPLEX_MODEL_CONFIG or --model-config): run tenantctl in the "
                          "directory holding model-config.yaml, pass --model-config, or give an absolute --store",
                          key="adapter_store")
    current = reg.list()
    if current and not any(_store_has(store, r.to_dict()) for r in current):
        sample = current[0]
        raise ConfigError(f"adapter store {store.location!r} holds none of the {len(current)} registered "
                          f"tenants' adapters (e.g. {sample.adapter_id} at {sample.path}): it is not the store "
                          "the workers read; use the model config the workers use (--model-config) or its "
                          "adapter_store", key="adapter_store")


def cmd_onboard(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    spec = BaseModelSpec.from_model_dir(base_model_dir(cfg), name=cfg.base_model_name or None)
    examples = with_examples(args.task, _read_examples(args.examples)) if args.examples else None  # bad: nothing written
    reg = _registry(cfg)
    store = _store(cfg)
    check_store(reg, store, anchored=args.store_anchored)
    rec = onboard(reg, store, spec, args.tenant, args.adapter_dir, cfg, task=args.task)
    key = ensure_key(reg, rec.tenant_id)
    text = f"onboarded {rec.adapter_id}\n{_record_text(rec)}"
    if key is not None:
        text += "\n" + _key_text(rec.tenant_id, key)
    doc = {"adapter_id": rec.adapter_id, "record": rec.to_dict(), "tenant_key": key}
    if examples is not None:  # after the version is committed: the policy may name only tasks that exist
        doc["examples"] = len(reg.update_policy(rec.tenant_id, examples).examples[rec.task])
        text += f"\nexample prompts of task {rec.task!r}: {doc['examples']}"
    out.result(doc, text)


def _read_examples(path: str) -> tuple[str, ...]:
    """Example prompts from FILE (one per line, or a JSON list; PolicyInvalid: exit 2)."""
    try:
        return parse_examples(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PolicyInvalid(f"examples file {path!r} is not UTF-8 text") from None


def cmd_router(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    """`router TENANT [header|classify] [--task T --examples FILE]`: one policy change (one event), or show."""
    if args.examples and not args.task:
        raise ConfigError("--examples needs --task (the task the prompts are examples of)")
    if args.task and not args.examples:
        raise ConfigError("--task names the task of --examples; give --examples FILE too")
    reg = _registry(cfg)
    if args.mode or args.examples or args.unknown_task:
        examples = _read_examples(args.examples) if args.examples else None
        policy = reg.update_policy(args.tenant, router_change(args.mode, args.task, examples, args.unknown_task))
    else:
        policy = reg.tenant_policy(args.tenant)
    doc = router_doc(args.tenant, policy)
    counts = ", ".join(f"{t}: {len(x)}" for t, x in doc["examples"].items()) or "none"
    out.result(doc, f"{args.tenant}: router {policy.router}; example prompts per task: {counts}; "
                    f"unknown task: {doc['unknown_task']}")


def _key_text(tenant: str, key: str) -> str:
    return (f"tenant key:  {key}\n"
            f"Store this key now, it is not shown again. Requests for {tenant!r} send it as X-Tenant-Key; "
            f"`tenantctl rotate-key {tenant}` issues a new one.")


def cmd_rotate_key(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    reg = _registry(cfg)
    key = rotate_key(reg, args.tenant)
    out.result({"tenant": args.tenant, "tenant_key": key},
               f"{args.tenant}: new key issued; the previous key no longer works\n{_key_text(args.tenant, key)}")


def cmd_export(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    doc = export_registry(_registry(cfg))
    text = json.dumps(doc, indent=2, sort_keys=True)
    if args.file == "-":
        print(text)  # the backup itself is the one JSON document on stdout
        return
    tmp = f"{args.file}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    n = len(doc["tenants"])
    out.result({"file": args.file, "tenants": n, "format_version": doc["format_version"]},
               f"exported {n} tenant(s) to {args.file}; back up the adapter store ({cfg.adapter_store}) alongside it")


def cmd_import(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise BackupInvalid(f"cannot read backup {args.file!r}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise BackupInvalid(f"backup {args.file!r} is not JSON: {e}") from e
    n = import_registry(_registry(cfg), data, replace=args.replace)
    store = _store(cfg)
    histories = [h for t in data["tenants"]
                 for h in [*t["history"], *(h for line in t.get("tasks", {}).values() for h in line["history"])]]
    missing = sorted({h["adapter_id"] for h in histories if not _store_has(store, h)},
                     key=lambda a: parse_task_adapter_id(a))
    if missing:
        print(f"tenantctl: warning: the adapter store {cfg.adapter_store} lacks the files of {', '.join(missing)}: "
              "restore the store directory too (workers refuse adapters whose files are missing)", file=sys.stderr)
    out.result({"imported": n, "missing_in_store": missing}, f"imported {n} tenant(s)")


def _store_has(store: AdapterStore, record: dict[str, Any]) -> bool:
    return store.has(TenantRecord.from_dict(record))


def cmd_list(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    recs = _registry(cfg).list()
    rows = [[r.tenant_id, r.task, r.adapter_id, r.status, str(r.rank), f"{r.alpha:g}", ",".join(r.target_modules),
             _ts(r.updated_at)] for r in recs]
    out.result({"tenants": [r.to_dict() for r in recs]},
               _table(rows, ["TENANT", "TASK", "ADAPTER", "STATUS", "RANK", "ALPHA", "TARGETS", "UPDATED"])
               if recs else "no tenants")


def cmd_show(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    reg = _registry(cfg)
    rec = reg.get(args.tenant, task=args.task)
    hist = reg.history(args.tenant, task=args.task)
    tasks = reg.tasks(args.tenant)
    digest = reg.get_key_digest(args.tenant)
    splits = reg.get_policy(args.tenant).splits
    versions = ", ".join(f"v{h.version}{'*' if h.version == rec.version else ''}" for h in hist)
    key = {"created_at": digest.created_at} if digest else None  # never the salt/digest: nothing to gain
    out.result({"record": rec.to_dict(), "history": [h.to_dict() for h in hist], "key": key, "tasks": tasks,
                "split": [{"version": a.version, "weight": a.weight} for a in splits.get(args.task, ())]},
               f"{_record_text(rec)}\nhistory:     {versions}\ntasks:       {', '.join(tasks)}\n"
               f"split:       {_split_text(splits.get(args.task, ()))}\n"
               f"key:         {'issued ' + _ts(digest.created_at) if digest else 'none (tenantctl rotate-key issues one)'}")


def cmd_status_change(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    status = "enabled" if args.command == "enable" else "disabled"
    rec = _registry(cfg).set_status(args.tenant, status)
    out.result({"record": rec.to_dict()}, f"{rec.tenant_id}: {rec.status} ({rec.adapter_id})")


def cmd_remove(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    reg = _registry(cfg)
    removed = reg.remove(args.tenant, task=args.task)  # registry first: workers stop resolving it at once
    store = _store(cfg)
    whole = args.task is None or not reg.exists(args.tenant)
    if whole:
        store.remove_tenant(args.tenant)
    else:  # only that task's versions: the other tasks' files stay
        for r in removed:
            store.remove_version(args.tenant, r.version)
    what = args.tenant if args.task is None else f"task {args.task!r} of {args.tenant}"
    doc: dict[str, Any] = {"removed": args.tenant, "versions": [r.version for r in removed]}
    if args.task is not None:
        doc.update(task=args.task, tenant_removed=whole)
    out.result(doc,
               f"removed {what} ({', '.join(r.adapter_id for r in removed) or 'no versions'})")


def cmd_rollback(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    reg = _registry(cfg)
    cur = reg.get(args.tenant, task=args.task)
    hist = {h.version: h for h in reg.history(args.tenant, task=args.task)}
    target = rollback_version(args.tenant, cur.version, hist, args.to_version)
    _store(cfg).verify(hist[target])  # never point workers at missing/altered files
    rec = reg.rollback(args.tenant, to_version=target, task=args.task)
    out.result({"record": rec.to_dict()}, f"{rec.tenant_id}: now serving {rec.adapter_id} (was {cur.adapter_id})")


def split_change(reg: TenantRegistry, store: AdapterStore, tenant: str, task: str,
                 arms: Sequence[SplitArm]) -> Callable[[TenantPolicy], TenantPolicy]:
    """The policy change that sets the task's A/B split (`tenantctl split`, `POST /tenants/<t>/split`),
    after checking each arm's stored files as a rollback does (never point workers at missing or
    altered files). The registry refuses, in `update_policy`, versions not in the task's history."""
    task = validate_task(task)
    if not arms:
        raise PolicyInvalid("a split needs arms, e.g. v3=90 v4=10 (or --clear to end it)")
    history = {h.version: h for h in reg.history(tenant, task=task)}  # TaskNotFound: exit 3 / 404
    for arm in arms:
        if arm.version in history:
            store.verify(history[arm.version])
    return lambda policy: policy.with_split(task, tuple(arms))


def clear_split(task: str | None) -> Callable[[TenantPolicy], TenantPolicy]:
    """The policy change that ends the task's split (None: every task's)."""
    if task is None:
        return lambda policy: policy.replace(splits={})
    task = validate_task(task)
    return lambda policy: policy.with_split(task, ())


def split_doc(tenant: str, policy: TenantPolicy) -> dict[str, Any]:
    return {"tenant": tenant, "splits": policy.to_dict()["splits"]}


def _split_text(arms: Sequence[SplitArm]) -> str:
    return " ".join(f"v{a.version}={a.weight}" for a in arms) or "none"


def cmd_split(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    reg = _registry(cfg)
    if args.clear:
        if args.arms:
            raise ConfigError("--clear takes no arms")
        policy = reg.update_policy(args.tenant, clear_split(args.task))
    elif args.arms:
        change = split_change(reg, _store(cfg), args.tenant, args.task or DEFAULT_TASK, parse_arms(args.arms))
        policy = reg.update_policy(args.tenant, change)
    else:
        policy = reg.tenant_policy(args.tenant)
    doc = split_doc(args.tenant, policy)
    lines = [f"{args.tenant}: task {t}: split {_split_text(arms)}" for t, arms in policy.splits.items()]
    out.result(doc, "\n".join(lines) or f"{args.tenant}: no A/B split")


def cmd_pin(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    reg = _registry(cfg)
    if args.command == "pin":
        changed = reg.pin(args.tenant, cfg.max_pinned_adapters)
        what = "pinned" if changed else "already pinned"
    else:
        changed = reg.unpin(args.tenant)
        what = "unpinned" if changed else "was not pinned"
    pinned = reg.pinned()
    out.result({"tenant": args.tenant, "pinned": args.tenant in pinned, "changed": changed, "all_pinned": pinned,
                "max_pinned_adapters": cfg.max_pinned_adapters},
               f"{args.tenant}: {what} ({len(pinned)} of at most {cfg.max_pinned_adapters} pinned: "
               f"{', '.join(pinned) or 'none'})")


def chain_policy(links: Sequence[str], threshold: float | None, cfg: LoraplexConfig) -> Callable[[TenantPolicy], TenantPolicy]:
    """The policy change that sets a fallback chain (`tenantctl chain`, `POST /tenants/<t>/chain`):
    the links parsed (ids.parse_link), at most `max_fanout_rows` of them (a worker runs them as that
    many rows), a threshold required. PolicyInvalid naming the problem; the registry checks the rest
    (ends with base, tasks and versions exist) in `update_policy`."""
    parsed = tuple(parse_link(link) for link in links)
    if not parsed:
        raise PolicyInvalid("a chain needs links ('<task>', '<task>@v<N>', ..., 'base')")
    if len(parsed) > cfg.max_fanout_rows:
        raise PolicyInvalid(f"a chain of {len(parsed)} links; workers run at most {cfg.max_fanout_rows} rows per "
                            f"request (max_fanout_rows)")
    if threshold is None:
        raise PolicyInvalid("a chain needs a threshold (the mean token log-prob a link's answer must reach)")
    return lambda policy: policy.replace(chain=parsed, chain_threshold=threshold)


def clear_chain(policy: TenantPolicy) -> TenantPolicy:
    return policy.replace(chain=(), chain_threshold=None)


def chain_doc(tenant: str, policy: TenantPolicy) -> dict[str, Any]:
    return {"tenant": tenant, "chain": [format_link(link) for link in policy.chain],
            "chain_threshold": policy.chain_threshold}


def cmd_chain(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    reg = _registry(cfg)
    if args.clear:
        if args.links or args.threshold is not None:
            raise ConfigError("--clear takes no links or --threshold")
        policy = reg.update_policy(args.tenant, clear_chain)
    elif args.links or args.threshold is not None:
        policy = reg.update_policy(args.tenant, chain_policy(args.links, args.threshold, cfg))
    else:
        policy = reg.tenant_policy(args.tenant)
    doc = chain_doc(args.tenant, policy)
    out.result(doc, f"{args.tenant}: " + (f"chain {' -> '.join(doc['chain'])}, threshold {policy.chain_threshold:g}"
                                          if policy.chain else "no fallback chain"))


def _token(args: argparse.Namespace, cfg: LoraplexConfig) -> str | None:
    """--token, else LORAPLEX_TS_TOKEN, else the management key in the key file; None when the key
    file does not exist (fetch_status then says the token is missing and where it lives)."""
    if getattr(args, "token", None):
        return args.token
    if env_value("LORAPLEX_TS_TOKEN"):
        return env_value("LORAPLEX_TS_TOKEN")
    path = Path(cfg.management_key_file)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        return doc["management"]["key"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read the management key from {str(path)!r}: {e}",
                          key="management_key_file") from e


def _no_token_hint(key_file: str | None) -> str:
    where = f" (looked in {key_file!r}: not there)" if key_file else ""
    return ("no TorchServe management token was given" + where + ": TorchServe writes it to key_file.json in the "
            "directory it was started from (the demo's: var/torchserve/key_file.json), under \"management\"; "
            "pass --key-file PATH, --token TOKEN or env LORAPLEX_TS_TOKEN")


def fetch_status(management_url: str, model_name: str, token: str | None,
                 timeout_s: float = TS_TIMEOUT_S, *, key_file: str | None = None) -> list[dict[str, Any]]:
    """GET <management_url>/models/<model>?customized=true and return one entry per model version:
    {"model_version", "pid", "engine", "active_adapter", "resident", "counters", "workers", "metadata_error"}.
    `key_file` only names, in the error for a missing token, where the token was looked for."""
    url = f"{management_url.rstrip('/')}/models/{urllib.parse.quote(model_name, safe='')}?customized=true"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        if token is None and e.code in (400, 401, 403):  # TorchServe answers 400 to a request without a token
            raise TorchServeRefused(f"TorchServe refused the request ({e.code}): {_no_token_hint(key_file)}") from e
        if e.code == 404:
            raise ModelNotFound(f"TorchServe at {management_url} has no model {model_name!r}") from e
        if e.code in (401, 403):
            raise TorchServeRefused(f"TorchServe refused the request ({e.code}): pass --token, "
                                    "LORAPLEX_TS_TOKEN or --key-file") from e
        if e.code >= 500:
            raise TorchServeUnreachable(f"TorchServe at {management_url} answered {e.code}") from e
        raise TorchServeRefused(f"TorchServe answered {e.code} for {url}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TorchServeUnreachable(f"TorchServe management API at {management_url} is unreachable: {reason}") from e
    try:
        versions = json.loads(body)
    except ValueError as e:
        raise TorchServeRefused(f"TorchServe answered non-JSON: {body[:200]!r}") from e
    if isinstance(versions, dict):
        versions = [versions]
    out = []
    for v in versions if isinstance(versions, list) else []:
        meta_raw = v.get("customizedMetadata") if isinstance(v, dict) else None
        meta, err = {}, None
        if isinstance(meta_raw, str):
            try:
                meta = json.loads(meta_raw)
            except ValueError:
                err = f"customizedMetadata is not JSON: {meta_raw[:200]!r}"
        elif isinstance(meta_raw, dict):
            meta = meta_raw
        elif meta_raw is None:
            err = "no customizedMetadata (is the loraplex handler serving this model?)"
        if not isinstance(meta, dict):
            meta, err = {}, "customizedMetadata is not a JSON object"
        out.append({
            "model_version": v.get("modelVersion") if isinstance(v, dict) else None,
            "pid": (meta.get("worker") or {}).get("pid") if isinstance(meta.get("worker"), dict) else None,
            "engine": meta.get("engine"), "active_adapter": meta.get("active_adapter"),
            "resident": meta.get("resident") or [], "counters": meta.get("counters") or {},
            "workers": v.get("workers", []) if isinstance(v, dict) else [], "metadata_error": err})
    return out


def cmd_tenant_status(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    """`status TENANT`: the tenant's tasks from the registry (no TorchServe call)."""
    reg = _registry(cfg)
    tasks = reg.tasks(args.tenant)
    if not tasks:
        raise TenantNotFound(args.tenant)
    lines = []
    for task in tasks:
        rec, hist = reg.get(args.tenant, task=task), reg.history(args.tenant, task=task)
        lines.append({"task": task, "adapter_id": rec.adapter_id, "status": rec.status,
                      "versions": [h.version for h in hist], "updated_at": rec.updated_at})
    rows = [[x["task"], x["adapter_id"], x["status"], ",".join(f"v{v}" for v in x["versions"]), _ts(x["updated_at"])]
            for x in lines]
    out.result({"tenant": args.tenant, "tasks": lines},
               f"tenant {args.tenant}: {len(tasks)} task(s)\n" + _table(rows, ["TASK", "ADAPTER", "STATUS", "VERSIONS",
                                                                               "UPDATED"]))


def cmd_status(args: argparse.Namespace, cfg: LoraplexConfig, out: _Out) -> None:
    if getattr(args, "tenant", None):
        return cmd_tenant_status(args, cfg, out)
    entries = fetch_status(cfg.management_url, cfg.model_name, _token(args, cfg), key_file=cfg.management_key_file)
    now = time.time()
    lines = []
    for e in entries:
        head = (f"model {cfg.model_name} v{e['model_version']}  worker pid {e['pid']}  engine {e['engine']}  "
                f"active {e['active_adapter']}  workers {len(e['workers'])}")
        lines.append(head)
        if e["metadata_error"]:
            lines.append(f"  ({e['metadata_error']})")
        rows = []
        for r in e["resident"]:
            if not isinstance(r, dict):
                continue
            lu = r.get("last_used")
            rows.append([str(r.get("adapter")), str(r.get("tenant")), str(r.get("version")), str(r.get("hits")),
                         f"{now - lu:.1f}s ago" if isinstance(lu, (int, float)) else "-",
                         f"{r.get('load_ms', 0):.1f}" if isinstance(r.get("load_ms"), (int, float)) else "-",
                         str(r.get("bytes"))])
        lines.append("  " + _table(rows, ["ADAPTER", "TENANT", "VER", "HITS", "LAST USED", "LOAD MS", "BYTES"])
                     .replace("\n", "\n  ") if rows else "  no resident adapters")
        if e["counters"]:
            lines.append("  counters: " + ", ".join(f"{k}={v}" for k, v in sorted(e["counters"].items())))
    out.result({"model": cfg.model_name, "management_url": cfg.management_url, "versions": entries},
               "\n".join(lines) if lines else f"model {cfg.model_name}: no versions reported")


COMMANDS = {"onboard": cmd_onboard, "list": cmd_list, "show": cmd_show, "disable": cmd_status_change,
            "enable": cmd_status_change, "remove": cmd_remove, "rollback": cmd_rollback, "status": cmd_status,
            "rotate-key": cmd_rotate_key, "export": cmd_export, "import": cmd_import, "pin": cmd_pin,
            "unpin": cmd_pin, "split": cmd_split, "chain": cmd_chain, "router": cmd_router}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tenantctl` console script; returns the exit code (see module docstring)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "split" and not any(e.startswith("-") for e in extra):
        args.arms = [*args.arms, *extra]  # `split acme --task default v3=90 v4=10`: arms after an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    out = _Out(bool(getattr(args, "json", False)))
    model_config = None
    try:
        model_config = find_model_config(getattr(args, "model_config", None))
        cfg = LoraplexConfig.load(model_config, overrides={
            "redis_url": getattr(args, "redis_url", None), "adapter_store": getattr(args, "store", None),
            "base_model_dir": getattr(args, "base_model_dir", None),
            "management_url": getattr(args, "management_url", None), "model_name": getattr(args, "model_name", None),
            "management_key_file": getattr(args, "key_file", None)})
        # A relative store is only trusted when a model config resolved it or the user named it.
        args.store_anchored = (os.path.isabs(cfg.adapter_store) or "://" in cfg.adapter_store
                               or model_config is not None
                               or getattr(args, "store", None) is not None
                               or "adapter_store" in settings_from_env(os.environ))
        COMMANDS[args.command](args, cfg, out)
        return EXIT_OK
    except (RegistryError, ConfigError, OSError) as e:
        code = _exit_code(e)
        out.error(e, code)
        if isinstance(e, RegistryUnavailable) and model_config is None:
            print(f"tenantctl: hint: no model config was read (no ./{MODEL_CONFIG_FILE} here, no "
                  "LORAPLEX_MODEL_CONFIG), so Redis is the default one; pass --model-config", file=sys.stderr)
        return code


def _console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _console()
