# The two set-up commands: `make demo` (install + the main job) and `make test` (install + the test suite).
VENV ?= .venv

.PHONY: install demo test lint bench

install:
	@bash scripts/install.sh

demo: install
	$(VENV)/bin/hcc demo

test: install
	$(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check backend tests bench

bench: install
	$(VENV)/bin/python bench/banking77.py
