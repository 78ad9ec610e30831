# Two commands for a fresh machine (see README):
#   make demo   set up .venv, run the default suite on the embedded dishes (offline), print where results are
#   make test   set up .venv if needed, run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision are pinned only here, to the releases this project is tested with; pyproject
# keeps open ranges (torch>=2.3) for users. Override: make TORCH_SPEC="torch torchvision" test
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# pip --index-url for torch/torchvision only: CPU-only wheels or one CUDA build, e.g.
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu setup
#   make TORCH_INDEX=https://download.pytorch.org/whl/cu126 setup
# Empty (default): PyPI, whose Linux wheels bundle CUDA.
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: demo test test-fast setup lint clean bench

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/foodlib suite suites/demo.yaml
	@echo "results: runs/demo/report.md, runs/demo/figures/, one executed notebook per run in runs/demo/<run>/"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/python -m pip install -q 'ruff>=0.5'
	$(BIN)/ruff check foodlib tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_pipeline.py

clean:
	rm -rf runs .pytest_cache
