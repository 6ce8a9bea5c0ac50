# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
SELFSUP := $(VENV)/bin/selfsup

.PHONY: setup demo test lint site serve bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[site,dev]'
	touch $@

demo: setup
	$(SELFSUP) validate
	$(SELFSUP) train simclr --out runs/demo-simclr-$$(date +%Y%m%d-%H%M%S)  # a fresh run directory each time

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -n auto --dist loadfile  # one worker per core; a file's tests (and its fixtures) stay on one worker

site: setup
	$(SELFSUP) site build --strict

serve: setup
	$(SELFSUP) site serve

bench: setup
	$(SELFSUP) bench knn-digits
