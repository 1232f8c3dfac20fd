# Two entry points: `make demo` (record a trace of the built-in demo model, draw a heatmap)
# and `make test` (the whole suite, as CI runs it). Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo.zarr

.PHONY: setup demo test lint format bench

setup: $(VENV)/.installed

# torch is pinned here, never resolved bare: the pair below is the CPU-usable build on this disk.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[tracer,diffsynth,test,bench,view]'
	touch $@

demo: setup
	$(VENV)/bin/attnscope record --demo --out $(DEMO) --overwrite
	$(VENV)/bin/attnscope heatmap $(DEMO) --span prompt --reduce mean --over step,layer,head -o demo-prompt.png

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n 2 -q

lint: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m bench
