# Two entry points for a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test clean

install: $(STAMP)

# CPU PyTorch 2.13.0 first (a bare `torch` would pull a multi-GB CUDA build), then the package with its CPU extras
# (llama-cpp-python compiles from source the first time, ~8 minutes on 2 cores; pip caches the wheel), then the
# Llama-2 tokenizer vocabulary, taken from the llama-cpp-python source package on PyPI.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --progress-bar on -e '.[cpu,train,serve,dev,video]'
	$(PY) -m sqllava_edge.vocab
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
