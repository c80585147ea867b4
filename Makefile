# vqkern: `make demo` and `make test` work from a fresh clone.
# Without a GPU they create .venv with the pinned CPU stack (requirements-cpu.txt);
# on a GPU machine install with `pip install --no-build-isolation .` instead.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all bench clean

$(STAMP): requirements-cpu.txt requirements-test.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt -r requirements-test.txt
	$(PY) -m pip install -q -e . --no-build-isolation
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m vqkern.demo

test: $(STAMP)
	$(PY) -m pytest tests -q

test-all: $(STAMP)
	$(PY) -m pytest tests -q -m "slow or not slow"

bench: $(STAMP)
	$(PY) -m benchmarks.run --device cpu --quick

clean:
	rm -rf $(VENV) build *.egg-info vqkern/*.so
