# Two entry points for users: `make demo` and `make test`. Both install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# XLA:CPU allocates each large buffer afresh on every step, and glibc maps it from the kernel each
# time, so a step pays page faults for its whole working set. jemalloc told never to return freed
# pages (`apt-get install libjemalloc2`) keeps them for the next step; where it is installed, the
# targets below run with it preloaded. `make test MALLOC=` runs with the system allocator.
MALLOC ?= $(firstword $(wildcard /usr/lib/*/libjemalloc.so.2))
MALLOC_CONF := dirty_decay_ms:-1,muzzy_decay_ms:-1
RUN := $(if $(MALLOC),env LD_PRELOAD=$(MALLOC) MALLOC_CONF=$(MALLOC_CONF)) $(PY)

.PHONY: install lint format test test-slow demo reference clean clean-cache

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,parity]'
	touch $(STAMP)

# The microsoft-aurora reference lives in its own virtualenv (its package is also called `aurora`),
# built once per machine in the per-user cache (see tests/reference/venv.py).
reference:
	$(PY) -m tests.reference.venv

# ruff's formatter and linter (rules in pyproject.toml); `make format` applies both.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(RUN) -m pytest -q

test-slow: install
	$(RUN) -m pytest -q -m slow

# LoRA rollout fine-tuning on the bundled sample, then scores and figures on its held-back days.
DEMO_CONFIG ?= configs/lora.py
demo: install
	$(RUN) main.py --config=$(DEMO_CONFIG) --workdir=workdir/demo
	$(RUN) main.py --config=$(DEMO_CONFIG) --workdir=workdir/demo --mode=test

clean:
	rm -rf $(VENV) .cache

# The reference virtualenv, its outputs and the XLA cache are shared by every clone on the machine.
clean-cache:
	rm -rf "$${AURORA_JAX_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/aurora-jax}"

# The wheels the GPU machine lacks (benchmarks/gpu/requirements-*.txt, our package built here),
# gathered where there is network into benchmarks/gpu/wheels/ (git-ignored); carry that folder with
# the tree and run `bash benchmarks/gpu/run.sh` there, offline.
GPU_WHEELS := benchmarks/gpu/wheels
.PHONY: gpu-wheels
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(VENV)/bin/pip wheel -q --no-deps -w $(GPU_WHEELS) .
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d $(GPU_WHEELS) \
	    $$(grep -hv -e '^#' -e '^aurora-jax' benchmarks/gpu/requirements-*.txt)
	@if ls $(GPU_WHEELS) | grep -v 'py3-none-any\.whl$$'; then echo "^ not pure Python"; exit 1; fi
	@du -sh $(GPU_WHEELS)
