# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup demo test clean bench-tables

setup: $(VENV)/.installed

# torch/torchvision pinned to the builds on this machine's disk; the package keeps a range.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[train,test]'   # the learner extra on top of the torch-free runtime
	touch $@

demo: setup
	$(VENV)/bin/cgil train --method all

test: setup
	$(VENV)/bin/python -m pytest -n 2 tests

# On a GPU machine: `cgil bench gpu` into the checked-in tables (a plain run writes to $CGIL_CACHE/bench).
bench-tables: setup
	$(VENV)/bin/cgil bench gpu --out benchmarks/results

clean:
	rm -rf $(VENV) runs .pytest_cache
