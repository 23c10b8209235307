"""Onboarding over HTTP: the `/tenants` management endpoints and a tenant's own `/tenant-adapters` publish.

    python -m tenant_registry.http_api --model-config model-config.yaml [--key-file var/torchserve/key_file.json]

A small HTTP service bound to `onboarding_address` (default 127.0.0.1:8083). TorchServe's management
API reaches it through loraplex's plugin (plugin/, built by scripts/build_plugin.sh, loaded by
`plugins_path` in config.properties): `/tenants...` on port 8081, behind TorchServe's management
token, is forwarded here as is. This service does the work with the functions `tenantctl` calls
(onboarding.onboard / ensure_key / rotate_key, registry, validate, quotas), so the two accept and
refuse the same things with the same messages, and it checks the management token itself (read from
TorchServe's key_file.json at every request, so a renewed key takes effect at once): a local process
talking to this port directly, past TorchServe, gets 401 too.

Why two paths in: TorchServe 0.12 frees a request's body before a plugin endpoint runs (its
HttpRequestHandler is an auto-releasing SimpleChannelInboundHandler and hands custom endpoints to a
thread pool; reading the body there throws IllegalReferenceCountException), so requests WITH a body
(a multipart upload) cannot pass through the plugin. Every endpoint is therefore also served here
directly: through TorchServe (8081) everything whose input fits in the URL (list, show, enable/disable,
rollback, remove, rotate-key, onboarding from a server-side `?path=`), here (8083) the same plus uploads.
The plugin refuses a request that carries a body with 501 naming this limit.

Routes (management token, `Authorization: Bearer <key_file.json management key>`):
  GET    /tenants                                 list (current record of every tenant's default task)
  GET    /tenants/<t>                             show: records per task, history, key issued?, quota usage
  POST   /tenants/<t>[?task=<task>][&path=<dir>]  onboard a new version: multipart upload of
  PUT    (same)                                   adapter_config.json + adapter_model.safetensors, or a
                                                  directory the server can read (`path`, query or JSON body)
  POST   /tenants/<t>/disable | /enable           status (covers all tasks)
  POST   /tenants/<t>/rollback[?task=][&to=N]     make an older version current
  POST   /tenants/<t>/rotate-key                  new tenant key (shown once)
  GET|POST|PUT|DELETE /tenants/<t>/split[?task=<task>][&arms=v3=90,v4=10]  A/B splits: show | set one
                                                  task's (JSON {"task", "arms": {"v3": 90, "v4": 10}}, or
                                                  the query, which passes the 8081 plugin) | clear (?task=:
                                                  that task's, else every task's)
  GET|POST|DELETE /tenants/<t>/chain[?links=a,b@v2,base&threshold=T]  the fallback chain: show | set
                                                  (query or JSON {"links", "threshold"}) | clear
  GET|POST /tenants/<t>/router[?mode=header|classify][&task=<task>&examples=<JSON list>]  the task router:
                                                  show | set the mode and/or one task's example prompts
                                                  (query, or a body: a JSON list or one prompt per line)
  DELETE /tenants/<t>[?task=<task>]               remove the tenant (or one task), records and files
Onboarding (both routes) may declare the task's router examples too: a multipart part `examples`, the JSON
body's "examples" list, or `&examples=<JSON list>`.
Route for a tenant (its own key, never the management token; this service only, not the plugin):
  POST   /tenant-adapters/<t>[?task=<task>]       multipart upload of a new version of one of the tenant's
                                                  OWN tasks: X-Tenant-Key must be <t>'s key (401), and
                                                  X-Tenant-ID, when sent, must be <t> (403: another tenant's)

Statuses (the one table: `status_of`): 400 bad input / adapter refused, 401 token or key, 403 another
tenant's / disabled tenant publishing, 404 unknown tenant, task, version or route, 405 method,
409 version conflict or quota_max_tasks / quota_max_versions, 413 body over the upload limit, an
oversized adapter or quota_max_bytes, 503 Redis unavailable, 500 anything else (a plain
sentence; the cause goes to this service's log).

Uploads are written, under names this code chooses from a fixed set of plain file names (never a
path from the request), into a fresh temporary directory that is removed afterwards; validation then
runs on that directory exactly as on `tenantctl onboard`'s, so a pickle, an oversized or malformed
safetensors file, a wrong shape etc. get the CLI's refusal and nothing is written anywhere.

Threads: one thread per connection (ThreadingHTTPServer); requests that write the registry or read
the store (AdapterStore reads into one shared buffer) are serialized by one lock; reads of the
registry alone run side by side.
"""
from __future__ import annotations

import argparse
import datetime
import email.parser
import email.policy
import hmac
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from loraplex_common.adapter_format import ADAPTER_FILES, MAX_CONFIG_BYTES
from loraplex_common.config import ConfigError, LoraplexConfig, find_model_config
from .cli import base_model_dir, chain_doc, chain_policy, check_store, clear_chain, clear_split, split_change, split_doc
from .errors import (AdapterInvalid, InvalidTaskName, InvalidTenantId, PolicyInvalid, RegistryError,
                     RegistryUnavailable, TenantExists, TenantNotFound, VersionConflict, VersionNotFound)
from .ids import validate_task, validate_tenant_id
from .keys import verify_key
from .onboarding import ensure_key, onboard, parse_examples, rotate_key, router_change, router_doc, with_examples
from .quotas import QuotaExceeded, QuotaLimits, usage
from .schema import parse_arms
from .registry import TenantRegistry, rollback_version
from .store import AdapterStore, open_store
from .validate import BaseModelSpec

log = logging.getLogger("loraplex.onboarding_http")

DEFAULT_TASK = "default"
UPLOAD_SLACK = 1 << 20          # multipart framing and small extra files on top of the two adapter files
MAX_PARTS = 16
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class HttpError(Exception):
    """A refusal this module makes itself (not a registry error): status + type + message."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_


def status_of(e: BaseException) -> int:
    """The HTTP status of an error: the one mapping of this API."""
    if isinstance(e, HttpError):
        return e.status
    if isinstance(e, QuotaExceeded):
        return 413 if e.quota == "bytes" else 409
    if isinstance(e, AdapterInvalid):
        return 413 if e.code == "too_large" else 400
    if isinstance(e, (InvalidTenantId, InvalidTaskName, PolicyInvalid)):
        return 400
    if isinstance(e, (TenantNotFound, VersionNotFound)):
        return 404
    if isinstance(e, (TenantExists, VersionConflict)):
        return 409
    if isinstance(e, RegistryUnavailable):
        return 503
    return 500


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, list[str]]   # lower-case name -> values
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower(), [])
        if len(values) > 1:
            raise HttpError(400, "BadRequest", f"{name} sent more than once")
        return values[0] if values else None


@dataclass
class Reply:
    status: int
    doc: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class OnboardingApi:
    """The endpoints, independent of the HTTP server (tests call `handle` too)."""

    def __init__(self, config: LoraplexConfig, *, key_file: str | os.PathLike, store_anchored: bool = True) -> None:
        self.config = config
        self.key_file = Path(key_file)
        self.registry = TenantRegistry(config.redis_url, config.redis_prefix)
        self.store: AdapterStore = open_store(config.adapter_store, config.adapter_store_endpoint)
        self.store_anchored = store_anchored
        self._spec: BaseModelSpec | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ auth
    def _management_key(self) -> str | None:
        """The management key in TorchServe's key file, or None when the file is missing, unreadable,
        or the key's "expiration time" has passed (TorchServe refuses it then too)."""
        try:
            entry = json.loads(self.key_file.read_text())["management"]
            key = entry["key"]
            expires = entry.get("expiration time")
            if expires is not None:
                when = datetime.datetime.strptime(str(expires)[:19], "%Y-%m-%dT%H:%M:%S")
                if when.replace(tzinfo=datetime.timezone.utc) <= datetime.datetime.now(datetime.timezone.utc):
                    log.warning("the management key in %s has expired", self.key_file)
                    return None
            return key if isinstance(key, str) and key else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _check_management(self, req: Request) -> None:
        auth = req.header("Authorization") or ""
        want = self._management_key()
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if want is None:
            log.error("management key file %s is missing, unreadable or expired: refusing every management "
                      "request", self.key_file)
        if not token or want is None or not hmac.compare_digest(token.encode(), want.encode()):
            raise HttpError(401, "Unauthorized", "TorchServe management token missing or wrong "
                                                 "(Authorization: Bearer <management key from key_file.json>)")

    def _check_tenant_key(self, req: Request, tenant: str) -> None:
        caller = req.header("X-Tenant-ID")
        key = req.header("X-Tenant-Key")
        caller = tenant if caller is None else validate_tenant_id(caller)
        digest = self.registry.get_key_digest(caller) if key else None
        if digest is None or not verify_key(digest, key):
            raise HttpError(401, "Unauthorized", "X-Tenant-Key missing or wrong for the tenant that sends it")
        if caller != tenant:
            raise HttpError(403, "Forbidden", f"tenant {caller!r} may publish only its own tasks, not {tenant!r}'s")

    # ------------------------------------------------------------------ dispatch
    def handle(self, req: Request) -> Reply:
        try:
            return self._route(req)
        except (HttpError, RegistryError, ConfigError) as e:
            status = status_of(e)
            if status >= 500 and not isinstance(e, HttpError):
                log.exception("%s %s failed", req.method, req.path)
                msg = ("the registry (Redis) is unavailable" if status == 503
                       else "the onboarding service failed; see its log")
            else:
                msg = str(e) or type(e).__name__
            return Reply(status, {"error": {"type": getattr(e, "type", None) or type(e).__name__, "message": msg,
                                            "code": getattr(e, "code", None), "status": status}})
        except Exception:
            log.exception("%s %s failed", req.method, req.path)
            return Reply(500, {"error": {"type": "InternalError", "message": "the onboarding service failed; "
                                         "see its log", "code": None, "status": 500}})

    def _route(self, req: Request) -> Reply:
        parts = [urllib.parse.unquote(p) for p in req.path.strip("/").split("/")] if req.path.strip("/") else []
        if parts[:1] == ["tenants"]:
            self._check_management(req)
            return self._management(req, parts[1:])
        if parts[:1] == ["tenant-adapters"] and len(parts) == 2:
            tenant = validate_tenant_id(parts[1])
            if req.method not in ("POST", "PUT"):
                raise HttpError(405, "MethodNotAllowed", f"{req.method} not allowed on /tenant-adapters/<tenant>")
            self._only(req, "task", "examples")
            self._check_tenant_key(req, tenant)
            tasks = self.registry.tasks(tenant)
            if tasks and self.registry.get(tenant, task=tasks[0]).status != "enabled":
                raise HttpError(403, "TenantDisabled", f"tenant {tenant!r} is disabled")
            return self._onboard(req, tenant, allow_path=False)
        raise HttpError(404, "NotFound", f"no such endpoint: {req.method} /{'/'.join(parts)[:80]}")

    def _management(self, req: Request, rest: list[str]) -> Reply:
        m = req.method
        if not rest:
            self._allow(m, "GET")
            self._only(req)
            return Reply(200, {"tenants": [r.to_dict() for r in self.registry.list()]})
        tenant = validate_tenant_id(rest[0])
        if len(rest) == 1:
            if m == "GET":
                self._only(req)
                return self._show(tenant)
            if m in ("POST", "PUT"):
                self._only(req, "task", "path", "examples")
                return self._onboard(req, tenant, allow_path=True)
            if m == "DELETE":
                self._only(req, "task")
                return self._remove(tenant, req.query.get("task"))
            raise HttpError(405, "MethodNotAllowed", f"{m} not allowed on /tenants/<tenant>")
        if len(rest) == 2 and rest[1] == "chain":
            return self._chain(req, tenant)
        if len(rest) == 2 and rest[1] == "router":
            return self._router(req, tenant)
        if len(rest) == 2 and rest[1] == "split":
            return self._split(req, tenant)
        if len(rest) == 2 and rest[1] in ("disable", "enable", "rollback", "rotate-key"):
            self._allow(m, "POST", "PUT")
            action = rest[1]
            if action == "rollback":
                self._only(req, "task", "to")
                return self._rollback(tenant, req.query.get("task", DEFAULT_TASK), req.query.get("to"))
            self._only(req)
            with self._lock:
                if action == "rotate-key":
                    return Reply(200, {"tenant": tenant, "tenant_key": rotate_key(self.registry, tenant)})
                rec = self.registry.set_status(tenant, "enabled" if action == "enable" else "disabled")
            return Reply(200, {"record": rec.to_dict()})
        raise HttpError(404, "NotFound", f"no such endpoint under /tenants/{tenant}: {'/'.join(rest[1:])[:80]!r}")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise HttpError(405, "MethodNotAllowed", f"{method} not allowed here (allowed: {', '.join(allowed)})")

    @staticmethod
    def _only(req: Request, *names: str) -> None:
        unknown = sorted(set(req.query) - set(names))
        if unknown:
            raise HttpError(400, "BadRequest", f"unknown query parameter(s): {', '.join(map(repr, unknown))[:120]}")

    # ------------------------------------------------------------------ endpoints
    def _show(self, tenant: str) -> Reply:
        tasks = self.registry.tasks(tenant)
        if not tasks:
            raise TenantNotFound(tenant)
        out: dict[str, Any] = {}
        for task in tasks:
            rec = self.registry.get(tenant, task=task)
            out[task] = {"record": rec.to_dict(),
                         "history": [h.to_dict() for h in self.registry.history(tenant, task=task)]}
        digest = self.registry.get_key_digest(tenant)
        for task, arms in split_doc(tenant, self.registry.get_policy(tenant))["splits"].items():
            out[task]["split"] = arms  # the task's A/B split, when it has one
        return Reply(200, {"tenant": tenant, "tasks": out,
                           "key": {"created_at": digest.created_at} if digest else None,
                           "quota": {"limits": QuotaLimits.from_config(self.config).to_dict(),
                                     "usage": usage(self.registry, tenant).to_dict()}})

    def _spec_(self) -> BaseModelSpec:
        if self._spec is None:
            self._spec = BaseModelSpec.from_model_dir(base_model_dir(self.config),
                                                      name=self.config.base_model_name or None)
        return self._spec

    def _onboard(self, req: Request, tenant: str, *, allow_path: bool) -> Reply:
        task = validate_task(req.query.get("task", DEFAULT_TASK))
        ctype = req.header("Content-Type") or ""
        path = req.query.get("path")
        examples = req.query.get("examples")  # the task's router examples (text: a JSON list or lines)
        if ctype.lower().startswith("application/json") and req.body:
            if not allow_path:
                raise HttpError(400, "BadRequest", "a tenant publishes by multipart upload only")
            doc = _json_body(req)
            if (not isinstance(doc, dict) or set(doc) - {"examples"} != {"path"} or not isinstance(doc["path"], str)
                    or not isinstance(doc.get("examples", []), list)):
                raise HttpError(400, "BadRequest", 'JSON body must be {"path": "<adapter dir on the server>"} '
                                                   '(and optionally "examples": ["<prompt>", ...])')
            path = doc["path"]
            if "examples" in doc:
                examples = json.dumps(doc["examples"])
        if path is not None:
            if not allow_path:
                raise HttpError(400, "BadRequest", "a tenant publishes by multipart upload only")
            if req.body and not ctype.lower().startswith("application/json"):
                raise HttpError(400, "BadRequest", "send either a path or an upload, not both")
            src = path[len("file://"):] if path.startswith("file://") else path
            if "://" in src or not os.path.isabs(src):
                raise HttpError(400, "BadRequest", "path must be an absolute directory on the server (or file://)")
            return self._do_onboard(tenant, task, Path(src), examples)
        if not ctype.lower().startswith("multipart/form-data"):
            raise HttpError(400, "BadRequest", "send the adapter as multipart/form-data (adapter_config.json and "
                                               "adapter_model.safetensors) or name a server directory with ?path=")
        tmp = Path(tempfile.mkdtemp(prefix="lpx-upload-"))
        try:
            src = tmp / "adapter"
            src.mkdir()
            _write_parts(ctype, req.body, src)
            part = src / "examples"  # not an adapter file (validation ignores it): the router examples
            if part.exists():
                examples = part.read_bytes().decode("utf-8", "replace")
            return self._do_onboard(tenant, task, src, examples)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _do_onboard(self, tenant: str, task: str, src: Path, examples: str | None = None) -> Reply:
        spec = self._spec_()
        change = with_examples(task, parse_examples(examples)) if examples is not None else None  # 400: nothing written
        with self._lock:
            check_store(self.registry, self.store, anchored=self.store_anchored)
            rec = onboard(self.registry, self.store, spec, tenant, src, self.config, task=task)
            key = ensure_key(self.registry, rec.tenant_id)
            doc = {"adapter_id": rec.adapter_id, "task": task, "record": rec.to_dict(), "tenant_key": key}
            if change is not None:  # after the version is committed: a policy names only tasks that exist
                doc["examples"] = len(self.registry.update_policy(tenant, change).examples[task])
        return Reply(200, doc)

    def _router(self, req: Request, tenant: str) -> Reply:
        """GET: the tenant's router and examples; POST/PUT: `mode` (header | classify) and/or one
        task's examples (`task` with `examples` in the query, which passes the 8081 plugin, or the
        body: a JSON list or one prompt per line), as one policy change: what `tenantctl router` does."""
        self._allow(req.method, "GET", "POST", "PUT")
        if req.method == "GET":
            self._only(req)
            return Reply(200, router_doc(tenant, self.registry.tenant_policy(tenant)))
        self._only(req, "mode", "task", "examples", "unknown_task")
        mode, task, unknown_task = req.query.get("mode"), req.query.get("task"), req.query.get("unknown_task")
        text = req.query.get("examples")
        if req.body:
            if text is not None:
                raise HttpError(400, "BadRequest", "send the examples in the query or the body, not both")
            text = req.body.decode("utf-8", "replace")
        if (task is None) != (text is None):
            raise HttpError(400, "BadRequest", "examples need a task (?task=<task>) and a task needs examples")
        if mode is None and task is None and unknown_task is None:
            raise HttpError(400, "BadRequest", "nothing to change: give ?mode=header|classify, ?task= with "
                                               "examples and/or ?unknown_task=reject|default|worker")
        if unknown_task is not None and unknown_task not in ("reject", "default", "worker"):
            raise HttpError(400, "BadRequest", "unknown_task must be reject, default or worker")
        change = router_change(mode, task, parse_examples(text) if text is not None else None, unknown_task)
        with self._lock:
            return Reply(200, router_doc(tenant, self.registry.update_policy(tenant, change)))

    def _chain(self, req: Request, tenant: str) -> Reply:
        """GET: the tenant's fallback chain; POST/PUT: set it (`links` comma-separated and `threshold`
        in the query, which passes the 8081 plugin, or a JSON body {"links": [...], "threshold": T});
        DELETE: clear it. The same change `tenantctl chain` makes (cli.chain_policy)."""
        self._allow(req.method, "GET", "POST", "PUT", "DELETE")
        if req.method == "GET":
            self._only(req)
            return Reply(200, chain_doc(tenant, self.registry.tenant_policy(tenant)))
        if req.method == "DELETE":
            self._only(req)
            with self._lock:
                return Reply(200, chain_doc(tenant, self.registry.update_policy(tenant, clear_chain)))
        self._only(req, "links", "threshold")
        if req.body:
            doc = _json_body(req)
            if (not isinstance(doc, dict) or set(doc) != {"links", "threshold"} or not isinstance(doc["links"], list)
                    or not all(isinstance(x, str) for x in doc["links"]) or req.query):
                raise HttpError(400, "BadRequest", 'JSON body must be {"links": ["<task>[@v<N>]", ..., "base"], '
                                                   '"threshold": <mean token log-prob>} (and no query)')
            links, threshold = doc["links"], doc["threshold"]
        else:
            links = [x for x in req.query.get("links", "").split(",") if x]
            threshold = req.query.get("threshold")
        try:
            if isinstance(threshold, bool):
                raise TypeError
            threshold = None if threshold is None else float(threshold)
        except (TypeError, ValueError):
            raise HttpError(400, "BadRequest", "threshold must be a number (a mean token log-prob)") from None
        change = chain_policy(links, threshold, self.config)
        with self._lock:
            return Reply(200, chain_doc(tenant, self.registry.update_policy(tenant, change)))

    def _split(self, req: Request, tenant: str) -> Reply:
        """GET: the tenant's A/B splits; POST/PUT: set one task's (a JSON body {"task": T, "arms":
        {"v3": 90, "v4": 10}}, or `?task=T&arms=v3=90,v4=10`); DELETE: end one task's (`?task=T`) or
        every task's. The changes `tenantctl split` makes (cli.split_change / clear_split)."""
        self._allow(req.method, "GET", "POST", "PUT", "DELETE")
        if req.method == "GET":
            self._only(req)
            return Reply(200, split_doc(tenant, self.registry.tenant_policy(tenant)))
        if req.method == "DELETE":
            self._only(req, "task")
            change = clear_split(req.query.get("task"))
            with self._lock:
                return Reply(200, split_doc(tenant, self.registry.update_policy(tenant, change)))
        self._only(req, "task", "arms")
        if req.body:
            doc = _json_body(req)
            arms = doc.get("arms") if isinstance(doc, dict) else None
            if (req.query or not isinstance(doc, dict) or not set(doc) <= {"task", "arms"} or not isinstance(arms, dict)
                    or not isinstance(doc.get("task", DEFAULT_TASK), str)):
                raise HttpError(400, "BadRequest", 'JSON body must be {"task": "<task>", "arms": {"v3": 90, "v4": 10}} '
                                                   '(and no query)')
            task = doc.get("task", DEFAULT_TASK)
            specs = [f"{k}={w}" if isinstance(w, int) and not isinstance(w, bool) else f"{k}=?" for k, w in arms.items()]
        else:
            task = req.query.get("task", DEFAULT_TASK)
            specs = [x for x in req.query.get("arms", "").split(",") if x]
        with self._lock:
            change = split_change(self.registry, self.store, tenant, task, parse_arms(specs))
            return Reply(200, split_doc(tenant, self.registry.update_policy(tenant, change)))

    def _remove(self, tenant: str, task: str | None) -> Reply:
        if task is not None:
            task = validate_task(task)
        with self._lock:
            removed = self.registry.remove(tenant, task=task)  # registry first: workers stop resolving it at once
            if task is None:
                self.store.remove_tenant(tenant)
            else:
                for r in removed:
                    self.store.remove_version(tenant, r.version)
        return Reply(200, {"removed": tenant, "task": task, "versions": [r.version for r in removed]})

    def _rollback(self, tenant: str, task: str, to: str | None) -> Reply:
        task = validate_task(task)
        if to is not None and not re.fullmatch(r"[0-9]{1,9}", to):
            raise HttpError(400, "BadRequest", "to must be a version number")
        with self._lock:
            cur = self.registry.get(tenant, task=task)
            hist = {h.version: h for h in self.registry.history(tenant, task=task)}
            target = rollback_version(tenant, cur.version, hist, None if to is None else int(to))
            self.store.verify(hist[target])  # never point workers at missing/altered files
            rec = self.registry.rollback(tenant, to_version=target, task=task)
        return Reply(200, {"record": rec.to_dict(), "previous": cur.adapter_id})


def max_upload_bytes(config: LoraplexConfig) -> int:
    """The largest body accepted: the two adapter files at their limits plus framing."""
    return config.max_adapter_bytes + MAX_CONFIG_BYTES + UPLOAD_SLACK


def _write_parts(content_type: str, body: bytes, dest: Path) -> None:
    """Write a multipart/form-data body's parts into `dest`, each under its form field name (curl's
    `-F adapter_config.json=@any/local/file`).

    The field name and the filename, when one is sent, must both be plain names: "../x", "a/b",
    dot-files, NUL or anything beyond 128 plain characters are refused (400) rather than renamed. Files are created with O_EXCL (a name
    twice is 400). Validation then sees exactly these files, as the CLI sees a directory."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    if not msg.is_multipart() or msg.defects:
        raise HttpError(400, "BadRequest", "malformed multipart/form-data body")
    parts = list(msg.iter_parts())
    if not parts or len(parts) > MAX_PARTS:
        raise HttpError(400, "BadRequest", f"multipart body must hold 1-{MAX_PARTS} files")
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        for given in (name, part.get_filename()):
            if given is not None and (not isinstance(given, str) or not _NAME_RE.fullmatch(given)):
                raise HttpError(400, "BadRequest", f"file name {str(given)[:60]!r} refused: plain names only "
                                                   f"({', '.join(ADAPTER_FILES)}), no paths")
        if name is None:
            raise HttpError(400, "BadRequest", "a multipart part without a form field name")
        data = part.get_payload(decode=True) or b""
        try:
            fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise HttpError(400, "BadRequest", f"file {name!r} sent twice") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)


# ---------------------------------------------------------------------------- HTTP server
def make_handler(api: OnboardingApi) -> type[BaseHTTPRequestHandler]:
    limit = max_upload_bytes(api.config)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "loraplex-onboarding"

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            try:
                query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True, strict_parsing=False,
                                                    max_num_fields=16))
            except ValueError:
                query = {"": ""}
            headers: dict[str, list[str]] = {}
            for k, v in self.headers.items():
                headers.setdefault(k.lower(), []).append(v)
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding"):
                return self._send(Reply(411, _err(411, "LengthRequired", "send a Content-Length (no chunked bodies)")),
                                  close=True)
            try:
                n = int(length or 0)
            except ValueError:
                return self._send(Reply(400, _err(400, "BadRequest", "bad Content-Length")), close=True)
            if n > limit:
                return self._send(Reply(413, _err(413, "PayloadTooLarge", f"body of {n} bytes exceeds the upload limit "
                                                  f"of {limit} (max_adapter_bytes + config + framing)")), close=True)
            body = self.rfile.read(n) if n > 0 else b""
            self._send(api.handle(Request(self.command, url.path, query, headers, body)))

        def _send(self, reply: Reply, close: bool = False) -> None:
            data = (json.dumps(reply.doc, indent=2, sort_keys=True) + "\n").encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in reply.headers.items():
                self.send_header(k, v)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), fmt % args)

    return Handler


def _json_body(req: Request) -> Any:
    """The request's body parsed as JSON; 400 naming the parse error otherwise."""
    try:
        return json.loads(req.body)
    except ValueError as e:
        raise HttpError(400, "BadRequest", f"body is not JSON: {e}") from None


def _err(status: int, type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "code": None, "status": status}}


def serve(api: OnboardingApi, address: str) -> ThreadingHTTPServer:
    """Bind `address` (host:port) and return the server (call serve_forever on it)."""
    host, _, port = address.rpartition(":")
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), make_handler(api))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tenant_registry.http_api", description=__doc__.split("\n")[0])
    p.add_argument("--model-config", metavar="PATH", help="model-config.yaml (default as tenantctl's)")
    p.add_argument("--key-file", metavar="PATH", help="TorchServe's key_file.json (default management_key_file)")
    p.add_argument("--address", help="host:port to listen on (default onboarding_address)")
    p.add_argument("--ready-file", metavar="PATH", help="write the bound address here once listening")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_config = find_model_config(args.model_config)
        cfg = LoraplexConfig.load(model_config, overrides={"management_key_file": args.key_file,
                                                           "onboarding_address": args.address})
        anchored = os.path.isabs(cfg.adapter_store) or "://" in cfg.adapter_store or model_config is not None
        api = OnboardingApi(cfg, key_file=cfg.management_key_file, store_anchored=anchored)
        server = serve(api, cfg.onboarding_address)
    except (ConfigError, RegistryError, OSError) as e:
        print(f"onboarding service: error: {e}", file=sys.stderr)
        return 2
    bound = f"{server.server_address[0]}:{server.server_address[1]}"
    log.info("onboarding service on http://%s (management key file %s)", bound, cfg.management_key_file)
    if args.ready_file:
        Path(args.ready_file).write_text(bound)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
