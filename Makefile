# ModelGuard — `make help` lists the targets.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-unit test-integration bench zoo proto proto-check lint fmt up down status logs clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

setup: ## Create .venv, install packages, fetch MNIST and Fashion-MNIST (idempotent)
	@bash scripts/setup.sh

demo: setup ## Run the main job on embedded defaults (all six services in one process)
	$(PY) -m modelguard.services.demo

test: setup ## Run the whole test suite, integration tests against real servers included
	$(PY) -m pytest -q

test-unit: setup ## Unit tests only
	$(PY) -m pytest -q tests/unit

test-integration: setup ## Integration tests only (starts Tansu, SeaweedFS, Prometheus itself)
	$(PY) -m pytest -q tests/integration

bench: setup ## Benchmarks (quality and speed figures; not tests)
	$(PY) -m bench.run_all

zoo: setup ## Train the model zoo (cached under .cache/zoo) and build the real-scale zoo (.cache/realzoo)
	$(PY) -m bench.zoo
	$(PY) -m bench.realzoo

proto: setup ## Regenerate Python code from proto/
	bash scripts/gen_proto.sh

proto-check: setup ## Fail when the committed generated code differs from proto/
	@tmp=$$(mktemp -d) && cp -r shared/proto $$tmp/committed && bash scripts/gen_proto.sh $$tmp/fresh \
	  && cp shared/proto/__init__.py $$tmp/fresh/__init__.py \
	  && diff -r -x __pycache__ $$tmp/committed $$tmp/fresh && echo "proto-check: generated code is current" ; \
	  rc=$$?; rm -rf $$tmp; exit $$rc

lint: setup ## ruff (lint + format check) and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: setup ## Format the code
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

up: setup ## Start the local stack (SeaweedFS, Tansu, the six services, Prometheus), supervised, on fixed ports
	$(PY) -m modelguard.services.stack up

down: ## Stop the local stack
	$(PY) -m modelguard.services.stack down

status: ## Each process of the local stack: state, pid, ports, up since, restarts, health
	$(PY) -m modelguard.services.stack status

logs: ## Tail of a local-stack log: make logs SERVICE=trigger-reversal (all when none given)
	$(PY) -m modelguard.services.stack logs $(SERVICE)

clean: ## Remove caches (keeps .venv and data)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .modelguard demo-out
