# loraplex: the two quick-start commands are `make demo` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
CACHE ?= $(HOME)/.cache/loraplex
BASE_MODEL := $(CACHE)/smollm2-135m-instruct
ADAPTERS := $(CACHE)/demo-adapters

.PHONY: install model archive adapters demo scaleout stop test test-fast clean

install:
	@bash scripts/install.sh

model: install
	@$(PY) model_store/convert_smollm2.py --out $(BASE_MODEL) >/dev/null

archive: model
	@$(PY) scripts/build_archive.py --base-model $(BASE_MODEL) --store model_store >/dev/null
	@echo "model archive: model_store/loraplex"

adapters: model
	@$(PY) demo/train_adapters.py --base-model $(BASE_MODEL) --out $(ADAPTERS)

demo: archive adapters
	@$(PY) demo/run_demo.py --base-model $(BASE_MODEL) --adapters $(ADAPTERS)

# N TorchServes of the demo archive on the demo's Redis and store, nginx on 127.0.0.1:8090 hashing
# X-Tenant-ID onto them (README, "Scaling out"); `make stop` stops them too.
N ?= 3
scaleout: archive
	@$(PY) scripts/nginx/scaleout.py start -n $(N)

stop:
	@$(PY) scripts/nginx/scaleout.py stop
	@$(PY) scripts/localstack.py stop

test: install
	@$(PY) -m pytest -q

test-fast: install
	@$(PY) -m pytest -q -m "not e2e"

clean: stop
	rm -rf var model_store/loraplex
