# Everyday commands; run them inside the project's virtual environment (README, "Two commands").
# `make check` is what CI runs (.ci/run): lint and type checks first, then the whole suite.

PYTHON ?= python
# The folders are import packages under other names (pyproject.toml maps server/ to
# plinth.server, ...); mypy cannot follow setuptools' editable finder, so it reads them through
# a tree of links named as they are imported.
TYPECHECK_ROOT := build/typecheck

.PHONY: help style lint typecheck test test-fast docs check

help:
	@echo "make style      format the tree and apply safe lint fixes"
	@echo "make lint       formatter check and lint (ruff), then mypy"
	@echo "make typecheck  mypy on plinth.nodes and plinth.server.engine"
	@echo "make test       the whole suite on both cores (slow tests included)"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make docs       regenerate docs/nodes.md and the gRPC stubs"
	@echo "make check      lint, then test: what CI runs"

style:
	ruff format .
	ruff check --fix .

lint: typecheck
	ruff format --check .
	ruff check .

typecheck:
	@mkdir -p $(TYPECHECK_ROOT)/plinth
	@touch $(TYPECHECK_ROOT)/plinth/__init__.py
	@ln -sfn ../../../nodes $(TYPECHECK_ROOT)/plinth/nodes
	@ln -sfn ../../../server $(TYPECHECK_ROOT)/plinth/server
	@ln -sfn ../../../clients/python $(TYPECHECK_ROOT)/plinth/clients
	MYPYPATH=$(TYPECHECK_ROOT) mypy --config-file pyproject.toml -p plinth.nodes -p plinth.server.engine

test:
	$(PYTHON) -m pytest -n 2

test-fast:
	$(PYTHON) -m pytest -n 2 -m "not slow"

docs:
	plinth nodes --markdown > docs/nodes.md
	$(PYTHON) protos/generate.py

check: lint test
