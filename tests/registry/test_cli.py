"""tenantctl end to end: the installed console script in a subprocess, real Redis, --json, exit codes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from loraplex_testing.services import free_port

from .hostile import pickle_bin
from .util import files_under, keys_under

TENANTCTL = Path(sys.executable).parent / "tenantctl"


@pytest.fixture
def ctl(redis_url, prefix, tmp_path, tiny_model_dir):
    if not TENANTCTL.exists():
        pytest.fail(f"{TENANTCTL} missing: run `pip install -e .`")
    mc = tmp_path / "model-config.yaml"
    mc.write_text(f"minWorkers: 1\nhandler:\n  redis_prefix: {prefix}\n  max_rank: 16\n"
                  f"  adapter_store: {tmp_path / 'store'}\n  base_model_dir: {tiny_model_dir}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["LORAPLEX_REDIS_URL"] = redis_url

    def run(*args: str, env_extra: dict | None = None) -> tuple[int, dict | None, str]:
        p = subprocess.run([str(TENANTCTL), "--model-config", str(mc), *args], capture_output=True, text=True,
                           env={**env, **(env_extra or {})}, timeout=60)
        doc = json.loads(p.stdout) if "--json" in args and p.stdout.strip() else None
        return p.returncode, doc, p.stdout + p.stderr
    return run


def test_cli_lifecycle(ctl, tiny_adapters, tmp_path):
    rc, doc, _ = ctl("--json", "onboard", "acme", str(tiny_adapters["a"]))
    assert rc == 0 and doc["adapter_id"] == "acme@v1" and doc["record"]["rank"] == 4
    rc, doc, _ = ctl("onboard", "acme", str(tiny_adapters["b"]), "--json")  # global flag after the command
    assert rc == 0 and doc["record"]["version"] == 2
    rc, _, text = ctl("onboard", "zeta", str(tiny_adapters["c"]))
    assert rc == 0 and "onboarded zeta@v1" in text and "sha256:" in text

    rc, doc, _ = ctl("--json", "list")
    assert rc == 0 and [(t["tenant_id"], t["version"]) for t in doc["tenants"]] == [("acme", 2), ("zeta", 1)]
    rc, _, text = ctl("list")
    assert rc == 0 and "acme@v2" in text and "TENANT" in text

    rc, doc, _ = ctl("--json", "show", "acme")
    assert rc == 0 and doc["record"]["adapter_id"] == "acme@v2" and [h["version"] for h in doc["history"]] == [1, 2]

    rc, doc, _ = ctl("--json", "disable", "acme")
    assert rc == 0 and doc["record"]["status"] == "disabled"
    rc, doc, _ = ctl("--json", "enable", "acme")
    assert rc == 0 and doc["record"]["status"] == "enabled"

    rc, doc, _ = ctl("--json", "rollback", "acme")
    assert rc == 0 and doc["record"]["adapter_id"] == "acme@v1"
    rc, doc, _ = ctl("--json", "rollback", "acme", "--to", "2")
    assert rc == 0 and doc["record"]["adapter_id"] == "acme@v2"
    rc, doc, _ = ctl("--json", "rollback", "acme", "--to", "9")
    assert rc == 3 and doc["error"]["type"] == "VersionNotFound" and doc["error"]["exit_code"] == 3
    rc, doc, _ = ctl("--json", "rollback", "zeta")
    assert rc == 3

    # A rollback target whose files were altered in the store is refused (exit 4) and nothing changes.
    w = tmp_path / "store" / "acme" / "v1" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + b"\0")
    rc, doc, _ = ctl("--json", "rollback", "acme")
    assert rc == 4 and doc["error"]["code"] == "sha256_mismatch"
    assert ctl("--json", "show", "acme")[1]["record"]["version"] == 2

    rc, doc, _ = ctl("--json", "remove", "acme")
    assert rc == 0 and doc == {"removed": "acme", "versions": [1, 2]}
    assert not (tmp_path / "store" / "acme").exists()
    rc, doc, text = ctl("--json", "show", "acme")
    assert rc == 3 and doc["error"]["type"] == "TenantNotFound" and "not registered" in text


def test_cli_refusals_and_exit_codes(ctl, tiny_adapters, tmp_path, raw_redis, prefix):
    src = tmp_path / "evil"
    shutil.copytree(tiny_adapters["a"], src)
    pickle_bin(src, tmp_path)
    rc, doc, text = ctl("--json", "onboard", "acme", str(src))
    assert rc == 4 and doc["error"]["code"] == "pickle_file" and "adapter_model.bin" in doc["error"]["message"]
    assert "pickle" in text
    assert keys_under(raw_redis, prefix) == [] and files_under(tmp_path / "store") == []

    rc, doc, _ = ctl("--json", "onboard", "../etc", str(tiny_adapters["a"]))
    assert rc == 2 and doc["error"]["type"] == "InvalidTenantId"
    rc, _, _ = ctl("show", "A" * 10_000)
    assert rc == 2
    rc, _, _ = ctl("frobnicate")
    assert rc == 2
    rc, _, _ = ctl("rollback", "acme", "--to", "x")
    assert rc == 2
    rc, doc, _ = ctl("--json", "onboard", "acme", str(tmp_path / "does-not-exist"))
    assert rc == 4 and doc["error"]["code"] == "not_a_directory"

    # Redis unreachable: exit 5, fast.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    rc, doc, _ = ctl("--json", "--redis-url", dead, "list")
    assert rc == 5 and doc["error"]["type"] == "RegistryUnavailable"
    rc, _, _ = ctl("list", env_extra={"LORAPLEX_REDIS_URL": dead})
    assert rc == 5

    # Bad configuration names the key: exit 2.
    rc, doc, _ = ctl("--json", "list", env_extra={"LORAPLEX_MAX_RANK": "many"})
    assert rc == 2 and "max_rank" in doc["error"]["message"]


class _FakeTorchServe(BaseHTTPRequestHandler):
    token = "s3cret"
    meta = {"worker": {"pid": 4242}, "engine": "multilora", "active_adapter": "acme@v2",
            "resident": [{"adapter": "acme@v2", "tenant": "acme", "version": 2, "last_used": 1.0e9, "hits": 7,
                          "load_ms": 12.5, "bytes": 36256}],
            "peft_config": {}, "counters": {"evictions": 1, "fallbacks": 0}}

    def do_GET(self):  # noqa: N802
        if self.headers.get("Authorization") is None:  # what TorchServe 0.12 answers without a token
            return self._send(400, {"code": 400, "message": "Token Authorization failed"})
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(401, {"code": 401, "message": "Token Authorization failed"})
        if not self.path.startswith("/models/loraplex?customized=true"):
            return self._send(404, {"code": 404, "message": "Model not found"})
        self._send(200, [{"modelName": "loraplex", "modelVersion": "1.0", "workers": [{"id": "9000"}],
                          "customizedMetadata": json.dumps(self.meta)}])

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_cli_status(ctl, tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _FakeTorchServe)
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        key_file = tmp_path / "key_file.json"
        key_file.write_text(json.dumps({"management": {"key": "s3cret", "expiration time": "x"},
                                        "inference": {"key": "other"}, "API": {"key": "api"}}))
        rc, doc, _ = ctl("--json", "status", "--management-url", url, "--key-file", str(key_file))
        assert rc == 0, doc
        v = doc["versions"][0]
        assert v["pid"] == 4242 and v["engine"] == "multilora" and v["resident"][0]["adapter"] == "acme@v2"
        rc, _, text = ctl("status", "--management-url", url, env_extra={"LORAPLEX_TS_TOKEN": "s3cret"})
        assert rc == 0 and "acme@v2" in text and "4242" in text and "evictions=1" in text
        rc, doc, _ = ctl("--json", "status", "--management-url", url, "--token", "wrong")
        assert rc == 1 and "refused" in doc["error"]["message"]
        rc, doc, _ = ctl("--json", "status", "--management-url", url, "--token", "s3cret", "--model-name", "x")
        assert rc == 3
        # No token anywhere: the error says so and where the token lives (was: 'TorchServe answered 400').
        rc, doc, text = ctl("--json", "status", "--management-url", url)
        msg = doc["error"]["message"]
        assert rc == 1 and "no TorchServe management token" in msg and "key_file.json" in msg, msg
        assert str(tmp_path / "var" / "torchserve" / "key_file.json") in msg  # the default it looked at
        rc, doc, _ = ctl("--json", "status", "--management-url", url, "--key-file", str(tmp_path / "nope.json"))
        assert rc == 1 and "nope.json" in doc["error"]["message"] and "--key-file" in doc["error"]["message"]
        # The default key file, relative to the model config's directory, is found without a flag.
        (tmp_path / "var" / "torchserve").mkdir(parents=True)
        shutil.copy(key_file, tmp_path / "var" / "torchserve" / "key_file.json")
        rc, doc, _ = ctl("--json", "status", "--management-url", url)
        assert rc == 0 and doc["versions"][0]["pid"] == 4242
    finally:
        server.shutdown()
        server.server_close()
    rc, doc, _ = ctl("--json", "status", "--management-url", f"http://127.0.0.1:{free_port()}")
    assert rc == 6 and doc["error"]["type"] == "TorchServeUnreachable"


def test_cli_tenant_keys(ctl, tiny_adapters, raw_redis, prefix):
    from tenant_registry.keys import KeyDigest, verify_key

    rc, doc, _ = ctl("--json", "onboard", "acme", str(tiny_adapters["a"]))
    key = doc["tenant_key"]
    assert rc == 0 and isinstance(key, str) and key.startswith("lpx_")
    digest = KeyDigest.from_json(raw_redis.get(f"{prefix}:key:acme"))
    assert verify_key(digest, key) and digest.digest != key
    rc, doc, _ = ctl("--json", "onboard", "acme", str(tiny_adapters["b"]))  # shown once: not again
    assert rc == 0 and doc["tenant_key"] is None and doc["record"]["version"] == 2
    assert KeyDigest.from_json(raw_redis.get(f"{prefix}:key:acme")) == digest

    rc, _, text = ctl("onboard", "zeta", str(tiny_adapters["c"]))  # text mode: the key and a warning
    assert rc == 0 and "Store this key now, it is not shown again" in text
    zeta_key = next(line.split()[-1] for line in text.splitlines() if line.startswith("tenant key:"))
    assert verify_key(KeyDigest.from_json(raw_redis.get(f"{prefix}:key:zeta")), zeta_key)
    rc, _, text = ctl("onboard", "zeta", str(tiny_adapters["a"]))
    assert rc == 0 and "tenant key" not in text and zeta_key not in text

    rc, doc, _ = ctl("--json", "show", "acme")
    assert rc == 0 and doc["key"] == {"created_at": digest.created_at} and key not in json.dumps(doc)

    rc, doc, _ = ctl("--json", "rotate-key", "acme")
    new = doc["tenant_key"]
    assert rc == 0 and doc["tenant"] == "acme" and new.startswith("lpx_") and new != key
    d2 = KeyDigest.from_json(raw_redis.get(f"{prefix}:key:acme"))
    assert verify_key(d2, new) and not verify_key(d2, key)
    rc, _, text = ctl("rotate-key", "zeta")
    assert rc == 0 and "Store this key now" in text and zeta_key not in text
    rc, doc, _ = ctl("--json", "rotate-key", "ghost")
    assert rc == 3 and doc["error"]["type"] == "TenantNotFound"
    rc, _, _ = ctl("rotate-key", "../x")
    assert rc == 2

    stored = b"".join(raw_redis.dump(k) for k in keys_under(raw_redis, prefix))
    assert new.encode() not in stored and key.encode() not in stored

    rc, doc, _ = ctl("--json", "remove", "acme")
    assert rc == 0 and raw_redis.get(f"{prefix}:key:acme") is None


def test_cli_export_import(ctl, tiny_adapters, tmp_path, redis_url):
    import uuid

    ctl("onboard", "acme", str(tiny_adapters["a"]))
    ctl("onboard", "acme", str(tiny_adapters["b"]))
    ctl("rollback", "acme")
    ctl("onboard", "zeta", str(tiny_adapters["c"]))
    ctl("disable", "zeta")
    backup = tmp_path / "backup.json"
    rc, doc, text = ctl("--json", "export", str(backup))
    assert rc == 0 and doc["tenants"] == 2 and doc["format_version"] == 1
    assert oct(backup.stat().st_mode & 0o777) == "0o600"
    rc, _, text = ctl("export")  # stdout
    assert rc == 0 and json.loads(text)["tenants"] == json.loads(backup.read_text())["tenants"]
    rc, _, text = ctl("export", str(tmp_path / "b2.json"))
    assert rc == 0 and "adapter store" in text

    rc, doc, _ = ctl("--json", "import", str(backup))  # same prefix: tenants exist
    assert rc == 1 and doc["error"]["type"] == "TenantExists"
    other = f"test-{uuid.uuid4().hex[:10]}"
    env = {"LORAPLEX_REDIS_PREFIX": other}
    rc, doc, _ = ctl("--json", "import", str(backup), env_extra=env)
    assert rc == 0 and doc == {"imported": 2, "missing_in_store": []}
    rc, doc, _ = ctl("--json", "list", env_extra=env)
    assert [(t["adapter_id"], t["status"]) for t in doc["tenants"]] == [("acme@v1", "enabled"),
                                                                          ("zeta@v1", "disabled")]
    rc, doc, _ = ctl("--json", "show", "acme", env_extra=env)
    assert [h["version"] for h in doc["history"]] == [1, 2] and doc["key"] is not None
    rc, doc, _ = ctl("--json", "import", str(backup), "--replace", env_extra=env)
    assert rc == 0 and doc["imported"] == 2

    # A store that lacks the files is reported (the import itself is of the registry only).
    rc, doc, text = ctl("--json", "import", str(backup), "--store", str(tmp_path / "empty-store"),
                        env_extra={"LORAPLEX_REDIS_PREFIX": f"test-{uuid.uuid4().hex[:10]}"})
    assert rc == 0 and doc["missing_in_store"] == ["acme@v1", "acme@v2", "zeta@v1"] and "restore the store" in text

    bad = tmp_path / "bad.json"
    for content in ["{not json", json.dumps({"format": "x"}), "\udcff"]:
        bad.write_text(content, errors="surrogateescape")
        rc, doc, _ = ctl("--json", "import", str(bad), env_extra=env)
        assert rc == 4 and doc["error"]["type"] == "BackupInvalid"
    rc, doc, _ = ctl("--json", "import", str(tmp_path / "missing.json"))
    assert rc == 4 and "cannot read" in doc["error"]["message"]


# ---------------------------------------------------------------------------- first use (issue 16, finding 7)
@pytest.fixture
def project(tmp_path, redis_url, prefix, tiny_model_dir):
    """A project directory as `make demo` leaves it: model-config.yaml with relative paths and the
    model archive (base model files copied flat) under model_store/loraplex."""
    proj = tmp_path / "proj"
    shutil.copytree(tiny_model_dir, proj / "model_store" / "loraplex")
    (proj / "model-config.yaml").write_text(
        f"minWorkers: 1\nhandler:\n  redis_url: {redis_url}\n  redis_prefix: {prefix}\n  max_rank: 16\n"
        "  adapter_store: var/adapters\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}

    def run(*args: str, cwd: Path = proj, env_extra: dict | None = None) -> tuple[int, dict | None, str]:
        p = subprocess.run([str(TENANTCTL), "--json", *args], capture_output=True, text=True, cwd=cwd,
                           env={**env, **(env_extra or {})}, timeout=60)
        return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None, p.stdout + p.stderr
    run.proj, run.elsewhere = proj, elsewhere
    return run


def test_cli_first_use_in_the_project_dir(project, tiny_adapters):
    """`tenantctl onboard acme ./adapter` with no flags: ./model-config.yaml gives Redis, the store and
    (through the archive) the base model."""
    rc, doc, text = project("onboard", "acme", str(tiny_adapters["a"]))
    assert rc == 0, text
    assert (project.proj / "var" / "adapters" / "acme" / "v1" / "adapter_model.safetensors").is_file()
    rc, doc, _ = project("list")
    assert rc == 0 and [t["adapter_id"] for t in doc["tenants"]] == ["acme@v1"]


def test_cli_relative_store_resolves_against_the_config_file(project, tiny_adapters):
    el = project.elsewhere
    rc, _, text = project("--model-config", "../proj/model-config.yaml", "onboard", "acme", str(tiny_adapters["a"]),
                          cwd=el)
    assert rc == 0, text
    rc, _, text = project("onboard", "zeta", str(tiny_adapters["b"]), cwd=el,
                          env_extra={"LORAPLEX_MODEL_CONFIG": str(project.proj / "model-config.yaml")})
    assert rc == 0, text
    assert sorted(p.name for p in (project.proj / "var" / "adapters").iterdir() if p.name != ".staging") == [
        "acme", "zeta"]
    assert list(el.iterdir()) == []  # nothing written under the current directory


def test_cli_refuses_a_store_the_workers_do_not_read(project, tiny_adapters, redis_url, prefix, tiny_model_dir):
    el = project.elsewhere
    assert project("onboard", "acme", str(tiny_adapters["a"]))[0] == 0
    # No model config here: the relative default store would land under ./var/adapters.
    bare = {"LORAPLEX_REDIS_URL": redis_url, "LORAPLEX_REDIS_PREFIX": prefix}
    rc, doc, _ = project("onboard", "zeta", str(tiny_adapters["b"]), "--base-model-dir", str(tiny_model_dir),
                         cwd=el, env_extra=bare)
    assert rc == 2 and doc["error"]["type"] == "ConfigError" and "no model config" in doc["error"]["message"]
    # A store that holds none of the registered tenants' files is another directory than the workers'.
    rc, doc, _ = project("onboard", "zeta", str(tiny_adapters["b"]), "--store", str(el / "other-store"),
                         env_extra={"LORAPLEX_MODEL_CONFIG": str(project.proj / "model-config.yaml")}, cwd=el)
    msg = doc["error"]["message"]
    assert rc == 2 and "not the store the workers read" in msg and "acme@v1" in msg
    assert list(el.iterdir()) == []
    rc, doc, _ = project("show", "zeta")
    assert rc == 3  # no record written


def test_cli_unknown_loraplex_variable_is_an_error(project):
    rc, doc, _ = project("list", env_extra={"LORAPLEX_NUM_SLOT": "4"})
    assert rc == 2 and "LORAPLEX_NUM_SLOT" in doc["error"]["message"]
    assert "did you mean LORAPLEX_NUM_SLOTS" in doc["error"]["message"]
    rc, _, _ = project("list", env_extra={"LORAPLEX_TS_TOKEN": "x", "LORAPLEX_CACHE": "/tmp"})  # not settings
    assert rc == 0


def test_cli_onboard_without_a_base_model_says_where_it_looked(project, tiny_adapters):
    shutil.rmtree(project.proj / "model_store")
    rc, doc, _ = project("onboard", "acme", str(tiny_adapters["a"]))
    msg = doc["error"]["message"]
    assert rc == 2 and "model_store" in msg and "--base-model-dir" in msg and "make archive" in msg


def test_cli_without_a_model_config_says_so(project):
    rc, _, text = project("list", cwd=project.elsewhere,
                          env_extra={"LORAPLEX_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert rc == 5 and "no model config was read" in text and "--model-config" in text
    rc, _, text = project("list", env_extra={"LORAPLEX_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert rc == 5 and "no model config was read" not in text  # ./model-config.yaml was read


def test_cli_tasks(ctl, tiny_adapters, tmp_path):
    """--task on onboard/show/rollback/remove; status TENANT lists the tasks; default is `default`."""
    assert ctl("--json", "onboard", "acme", str(tiny_adapters["a"]))[1]["adapter_id"] == "acme@v1"
    rc, doc, _ = ctl("--json", "onboard", "acme", str(tiny_adapters["b"]), "--task", "summarize")
    assert rc == 0 and doc["adapter_id"] == "acme:summarize@v2" and doc["record"]["task"] == "summarize"
    assert doc["tenant_key"] is None  # the tenant's key was issued with its first task
    rc, doc, _ = ctl("--json", "onboard", "acme", str(tiny_adapters["c"]), "--task", "summarize")
    assert rc == 0 and doc["adapter_id"] == "acme:summarize@v3"
    rc, doc, _ = ctl("--json", "onboard", "acme", str(tiny_adapters["c"]), "--task", "Bad:Task")
    assert rc == 2 and doc["error"]["type"] == "InvalidTaskName"

    rc, doc, _ = ctl("--json", "status", "acme")
    assert rc == 0 and [(t["task"], t["adapter_id"], t["versions"]) for t in doc["tasks"]] == [
        ("default", "acme@v1", [1]), ("summarize", "acme:summarize@v3", [2, 3])]
    rc, _, text = ctl("status", "acme")
    assert rc == 0 and "summarize" in text and "acme:summarize@v3" in text
    assert ctl("--json", "status", "nobody")[0] == 3
    rc, doc, _ = ctl("--json", "show", "acme", "--task", "summarize")
    assert rc == 0 and doc["record"]["adapter_id"] == "acme:summarize@v3" and doc["tasks"] == ["default", "summarize"]
    assert [h["version"] for h in doc["history"]] == [2, 3]
    assert ctl("--json", "show", "acme")[1]["record"]["adapter_id"] == "acme@v1"
    rc, doc, _ = ctl("--json", "show", "acme", "--task", "translate")
    assert rc == 3 and doc["error"]["type"] == "TaskNotFound"
    rc, doc, _ = ctl("--json", "list")
    assert [t["adapter_id"] for t in doc["tenants"]] == ["acme@v1", "acme:summarize@v3"]

    rc, doc, _ = ctl("--json", "rollback", "acme", "--task", "summarize")
    assert rc == 0 and doc["record"]["adapter_id"] == "acme:summarize@v2"
    assert ctl("--json", "rollback", "acme")[0] == 3  # the default task has nothing older
    assert ctl("--json", "rollback", "acme", "--task", "summarize", "--to", "1")[0] == 3  # v1 is default's

    rc, doc, _ = ctl("--json", "remove", "acme", "--task", "summarize")
    assert rc == 0 and doc == {"removed": "acme", "task": "summarize", "tenant_removed": False, "versions": [2, 3]}
    assert sorted(p.name for p in (tmp_path / "store" / "acme").iterdir()) == ["v1"]  # only that task's files
    assert ctl("--json", "show", "acme")[1]["tasks"] == ["default"]
