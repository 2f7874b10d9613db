# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test test-fast lint bench-tables clean

setup: $(VENV)/.installed

# torch/torchvision pinned to the builds on this machine's disk; the package keeps a range.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[train,test]'   # the learner extra on top of the torch-free runtime
	touch $@

demo: setup
	$(VENV)/bin/cgil train --method all

# CI runs everything (.ci/run); gpu tests skip where there is no GPU.
test: setup
	$(VENV)/bin/python -m pytest -n 2 tests

# The edit-test loop: no training run, export, spawned venv or fuzzing (markers in pyproject.toml).
test-fast: setup
	$(VENV)/bin/python -m pytest -n 2 -m "not slow and not gpu" tests

# ruff's rules and its few ignores are in pyproject.toml; CI fails on any finding.
lint: setup
	$(VENV)/bin/ruff check .

# Benchmarks write outside the checkout ($CGIL_CACHE/bench, ~/.cache/cgil/bench, or --out). Publishing into
# benchmarks/results and its README is explicit:
#   make bench-tables PUBLISH="~/.cache/cgil/bench/update-amd-epyc-2c.json ..."   chosen CPU results
#   make bench-tables GPU=1    on a GPU machine: cgil bench gpu --out benchmarks/results first
bench-tables: setup
	$(if $(GPU),$(VENV)/bin/cgil bench gpu --out benchmarks/results)
	$(PY) -m benchmarks.readme $(if $(PUBLISH),--publish $(PUBLISH))

clean:
	rm -rf $(VENV) runs .pytest_cache
