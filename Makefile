# gn_det: `make demo` and `make test` set up what they need first (tools/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export GN_DET_VENV := $(abspath $(VENV))

.PHONY: setup demo lint test test-slow test-gpu env clean-venv

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py

# The default suite: everything but tests marked slow; CPU only (GPU tests run where a GPU is).
# TEST_JOBS processes (pytest-xdist), each test file in one of them (its module fixtures run once).
TEST_JOBS ?= 2
test: setup lint
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

# The linter (ruff.toml): before the tests, in seconds.
lint: setup
	$(PY) -m ruff check .

# Slower tests (e.g. longer trainings), kept out of the default run.
test-slow: setup
	$(PY) -m pytest -q -m slow

# The GPU tests alone (CUDA machines; elsewhere they are all skipped).
test-gpu: setup
	$(PY) -m pytest -q -m gpu

env: setup
	$(PY) -m gn_det.env

clean-venv:
	rm -rf $(VENV)
