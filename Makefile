# groupvit-jax: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export TF_CPP_MIN_LOG_LEVEL ?= 3
# XLA:CPU steps otherwise spend up to a third of their time faulting fresh buffers in
# (groupvit_jax/cpu_env.py): jemalloc without page purging where it is installed (apt install libjemalloc2;
# JEMALLOC= turns it off), and huge pages for glibc malloc. The settings: groupvit_jax/cpu_allocator.env.
include groupvit_jax/cpu_allocator.env
export GLIBC_TUNABLES ?= $(CPU_MALLOC_TUNABLES)
JEMALLOC ?= $(shell $(PYTHON) -c 'import ctypes.util; print(ctypes.util.find_library("jemalloc") or "")' 2>/dev/null)
JEMALLOC := $(JEMALLOC)
ifneq ($(JEMALLOC),)
ifeq ($(findstring jemalloc,$(LD_PRELOAD)),)
export LD_PRELOAD := $(strip $(LD_PRELOAD) $(JEMALLOC))
endif
export MALLOC_CONF ?= $(JEMALLOC_CONF)
endif

.PHONY: install install-core demo test test-all bench

install:
	$(PIP) install -q -e '.[test,torch]'

install-core:
	$(PIP) install -q -e .

DEMO_DIR ?= /tmp/groupvit_jax_demo

demo: install-core
	rm -rf $(DEMO_DIR)
	$(PYTHON) -m groupvit_jax.demo --workdir=$(DEMO_DIR)

# The test suite (what CI runs), its 10 slowest tests and its total time; test-all adds the slow ones.
test: install
	$(PYTHON) -m pytest -q -n 2 --durations=10 tests

test-all: install
	$(PYTHON) -m pytest -q -n 2 --durations=10 -m "slow or not slow" tests

bench: install
	$(PYTHON) -m benchmarks.train_step --config=configs/tiny.py --batch_sizes=16,64
	$(PYTHON) -m benchmarks.eval_throughput
	$(PYTHON) -m benchmarks.input_pipeline
