# Two entry points: `make run` (set up, then run the demo grid) and `make test`.
# torch==2.13.0 is installed before the package so that the `torch>=2.2`
# requirement is already met and pip never pulls a multi-gigabyte CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bdbench-installed
TEST_STAMP := $(VENV)/.bdbench-test-installed
OUT ?= bdbench-out

.PHONY: setup run test clean

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

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(OUT)
