# Two entry points: `make run` (set up, then run the demo grid) and `make test`.
# torch==2.13.0 is installed before the package so that the `torch>=2.2`
# requirement is already met and pip never pulls a multi-gigabyte CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bdbench-installed
TEST_STAMP := $(VENV)/.bdbench-test-installed
OUT ?= bdbench-out

.PHONY: setup run lint test test-avx2 clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The tests also need the optional Ray extra (the ray executor's test starts a local cluster).
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	touch $(TEST_STAMP)

run: setup
	$(BIN)/bdbench run demo --out $(OUT)

# ruff and mypy, as configured in pyproject.toml (pre-commit runs the same two before a commit).
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools examples
	$(BIN)/mypy

test: $(TEST_STAMP) lint
	$(BIN)/python -m pytest -q

# The effect tests (tests/effects.py) on PyTorch's and oneDNN's AVX2 kernels, as on most laptops.
test-avx2: $(TEST_STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q -m effect

clean:
	rm -rf $(OUT)
