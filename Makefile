# zonewatch: `make help` lists the targets. CI runs `make test`, as a developer does.
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST := $(PY) -m pytest
STAMP := .venv/.zonewatch-setup

.DEFAULT_GOAL := help
.PHONY: help setup lint typecheck test test-unit test-integration test-e2e test-resilience demo bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: ## install everything on a fresh machine (idempotent)
	@bash scripts/setup.sh

$(STAMP): pyproject.toml scripts/setup.sh
	@bash scripts/setup.sh && touch $(STAMP)

lint: $(STAMP) ## ruff and mypy --strict
	$(PY) -m ruff check zonewatch exporters tests
	$(PY) -m ruff format --check zonewatch exporters tests
	$(PY) -m mypy -p zonewatch

test: $(STAMP) ## the whole suite: lint, unit, integration (live BPF), e2e (real zones)
	@bash scripts/setup.sh >/dev/null
	ZONEWATCH_STRICT_SKIPS=1 $(PYTEST) tests

test-unit: $(STAMP) ## unit tests only (no root needed)
	$(PYTEST) tests/unit

test-integration: $(STAMP) ## live BPF tests
	$(PYTEST) tests/integration

test-e2e: $(STAMP) ## tests on real lab zones
	$(PYTEST) tests/e2e

test-resilience: $(STAMP) ## event storm, zone churn, pid reuse, full disk, failing consumers, hostile strings
	$(PYTEST) tests/resilience

demo: $(STAMP) ## lab zones of two tenants, one compromised, and the agent's live UI (Ctrl-C stops all)
	@bash scripts/setup.sh >/dev/null
	$(PY) -m zonewatch.demo

bench: $(STAMP) ## benchmarks side by side with their baselines -> bench/results.json
	$(PY) -m bench

clean: ## stop lab zones and remove the venv
	-$(PY) -m zonewatch lab down
	rm -rf .venv
