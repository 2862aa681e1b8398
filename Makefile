# `make demo` and `make test` work on a fresh machine: they create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv install demo test test-fast bench bench-smoke clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Put `dsparse` on PATH: it is installed (editable) in .venv; activating .venv puts it on PATH.
install: $(STAMP)
	@echo "dsparse is installed in $(VENV). To put it on your PATH in this shell:"
	@echo "    source $(VENV)/bin/activate"

# The main job on the built-in local cluster: probe -> plan -> train -> status.
demo: $(STAMP)
	$(VENV)/bin/dsparse probe
	$(VENV)/bin/dsparse plan --model mobilenet_v2 --batch-size 32 --image-size 64 --exclude-small
	$(VENV)/bin/dsparse train --dataset digits --epochs 5 --lr 0.1
	$(VENV)/bin/dsparse status

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not e2e" $(PYTEST_ARGS)

# dsparse against torchrun + DDP (and PowerSGD) on local boards: bench/results/edge.{json,md}.
bench: $(STAMP)
	$(PY) bench/edge.py

# The same, 2 boards x tiny_cnn x 4 steps, every method (tests/unit/test_bench_edge.py runs it too).
bench-smoke: $(STAMP)
	$(PY) bench/edge.py --smoke

clean:
	rm -rf .dsparse .pytest_cache
