#!/usr/bin/env bash
# Build loraplex's TorchServe plugin (plugin/: /tenants on the management API, /tenant-adapters on the
# inference API, both forwarding to tenant_registry/http_api.py) into build/plugins/loraplex-plugin.jar,
# compiled against the installed TorchServe's own frontend jar (its org.pytorch.serve.servingsdk
# classes and Netty). config.properties' plugins_path points TorchServe at build/plugins.
# Rebuilds only when a source is newer than the jar. Needs javac (JDK 17: scripts/install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
TS_JAR=$(ls .venv/lib/python3*/site-packages/ts/frontend/model-server.jar 2>/dev/null | head -1)
[ -n "$TS_JAR" ] || { echo "build_plugin: TorchServe's model-server.jar not found in .venv (run make install)" >&2; exit 1; }
OUT=build/plugins/loraplex-plugin.jar
if [ -f "$OUT" ] && [ -z "$(find plugin -newer "$OUT" -type f | head -1)" ]; then exit 0; fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
javac --release 17 -nowarn -cp "$TS_JAR" -d "$work" $(find plugin/src -name '*.java')
cp -r plugin/META-INF "$work/"
mkdir -p build/plugins
(cd "$work" && jar cf plugin.jar META-INF org) && mv "$work/plugin.jar" "$OUT"
echo "built $OUT"
