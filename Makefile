# vqkern: `make demo` and `make test` work from a fresh clone.
# Without a GPU they create .venv with the pinned CPU stack (requirements-cpu.txt, which
# also brings the build tools: setuptools, pybind11, cmake, ninja) and install vqkern
# editable into it without build isolation, so a rebuild needs no download. On a GPU
# machine, `pip install .` into the environment that has CUDA torch (docs/getting-started.md, Install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo fashion-mnist espeak-ng test test-all bench package-smoke dev docs lint release-check clean

# `make demo` trains a small VQ-VAE on Fashion-MNIST after the backend check: 600 steps
# of batch 64 at about 80 ms/step; the whole demo took about 90 s on 2 CPU cores with .venv
# installed (the backend check runs the Triton kernels in the interpreter)
# (benchmarks/results/cpu/train/2026-11-25-fashion-mnist.md).
# FASHION_MNIST=<folder of Fashion-MNIST's IDX files> runs the training demo without apt.
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo
DEMO_STEPS ?= 600
DEMO_EVAL_IMAGES ?= 2000
DEMO_ARGS ?=
DEMO_TRAIN = $(PY) -m vqkern.train vqvae --data $(FASHION_MNIST) --ema --dead-code-threshold 1 --steps $(DEMO_STEPS) \
	--eval-images $(DEMO_EVAL_IMAGES) --out $(DEMO_OUT) $(DEMO_ARGS)

# .venv/bin first on PATH for the install: setup.py then runs the cmake and ninja installed there.
$(STAMP): requirements-cpu.txt requirements-test.txt requirements-test-nodeps.txt pyproject.toml setup.py CMakeLists.txt \
		$(wildcard csrc/*.c* csrc/*.h csrc/cpu/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -r requirements-test-nodeps.txt
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip install -q -e . --no-build-isolation
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m vqkern.demo
	@$(MAKE) --no-print-directory fashion-mnist || \
	  echo "make demo: Fashion-MNIST is not installed, skipping the training demo"
	@if [ -d $(FASHION_MNIST) ]; then echo '$(DEMO_TRAIN)'; $(DEMO_TRAIN); fi

# Fashion-MNIST from the Debian/Ubuntu package dataset-fashion-mnist (30 MB), through
# sudo only when not root; fails with the reason when the machine has no apt-get or no sudo.
fashion-mnist:
	@if [ -d $(FASHION_MNIST) ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "no apt-get here: download Fashion-MNIST's IDX files and run make demo FASHION_MNIST=<their folder>"; exit 1; fi; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	else echo "not root and no sudo: run 'apt-get install dataset-fashion-mnist' as root"; exit 1; fi; \
	echo "installing Fashion-MNIST: $$sudo apt-get install dataset-fashion-mnist"; \
	$$sudo apt-get update -qq && $$sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null && \
	test -d $(FASHION_MNIST)

# espeak-ng (Debian/Ubuntu package, about 10 MB with its voices) synthesizes offline the speech
# that python -m benchmarks.patch_audio_train trains encodec's model on; apt-get as for Fashion-MNIST.
espeak-ng:
	@command -v espeak-ng >/dev/null 2>&1 && exit 0; \
	command -v apt-get >/dev/null 2>&1 || { echo "no apt-get here: install espeak-ng by other means"; exit 1; }; \
	sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	$$sudo apt-get update -qq && $$sudo apt-get install -y -qq espeak-ng >/dev/null

test: $(STAMP)
	$(PY) -m pytest tests -q

test-all: $(STAMP)
	$(PY) -m pytest tests -q -m "slow or not slow"

bench: $(STAMP)
	$(PY) -m benchmarks.run --device cpu --quick

# The wheel as a user gets it: isolated sdist + wheel build, a fresh venv, a smoke test (CI runs it).
package-smoke:
	bash .ci/package_smoke.sh

# Contributor tools in their own venv (.venv-dev: the pinned docs site, ruff, clang-format,
# pre-commit, build, twine), so the test environment keeps its pins.
DEV_VENV := .venv-dev
DEV_PY := $(DEV_VENV)/bin/python
DEV_STAMP := $(DEV_VENV)/.installed
CSRC := $(wildcard csrc/*.cu csrc/*.cuh csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)

$(DEV_STAMP): requirements-docs.txt requirements-dev.txt
	test -x $(DEV_PY) || $(PYTHON) -m venv $(DEV_VENV)
	$(DEV_PY) -m pip install -q --upgrade pip
	$(DEV_PY) -m pip install -q -r requirements-docs.txt -r requirements-dev.txt
	touch $(DEV_STAMP)

dev: $(DEV_STAMP)

# The documentation site into site/; --strict: a broken link, a missing page or an API entry
# that does not resolve fails it. NO_MKDOCS_2_WARNING silences the theme's end-of-life banner.
docs: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 $(DEV_VENV)/bin/mkdocs build --strict

# Checks only: ruff over the Python tree, clang-format over csrc/ (.clang-format). Fixes:
# `ruff check --fix .` and `clang-format -i FILE`, or pre-commit on each commit.
lint: $(DEV_STAMP)
	@rc=0; $(DEV_VENV)/bin/ruff check . || rc=1; \
	$(DEV_VENV)/bin/clang-format --dry-run --Werror $(CSRC) || rc=1; \
	exit $$rc

# sdist + wheel into dist-release/, twine check --strict, one version everywhere.
release-check: $(DEV_STAMP)
	PY=$(DEV_PY) bash .ci/release_check.sh

clean:
	rm -rf $(VENV) $(DEV_VENV) .venv-smoke build dist dist-release site *.egg-info vqkern/*.so
