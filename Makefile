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

.PHONY: install install-core browser demo app test test-all bench

install:
	$(PIP) install -q -e '.[test,torch]'

install-core:
	$(PIP) install -q -e .

DEMO_DIR ?= /tmp/groupvit_jax_demo

demo: install-core
	rm -rf $(DEMO_DIR)
	$(PYTHON) -m groupvit_jax.demo --workdir=$(DEMO_DIR)

# The page over the demo's checkpoint (docs/app.md): http://127.0.0.1:7860
app:
	$(PIP) install -q -e '.[app]'
	$(PYTHON) -m groupvit_jax.app --checkpoint=$(DEMO_DIR)

# The page's test drives Debian's Chromium through its ChromeDriver (tests/test_app.py).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromedriver || $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null || \
	  ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null)

# The test suite (what CI runs), its 10 slowest tests and its total time; test-all adds the slow ones.
test: install browser
	$(PYTHON) -m pytest -q -n 2 --durations=10 tests

test-all: install browser
	$(PYTHON) -m pytest -q -n 2 --durations=10 -m "slow or not slow" tests

bench: install
	$(PYTHON) -m benchmarks.train_step --config=configs/tiny.py --batch_sizes=16,64
	$(PYTHON) -m benchmarks.eval_throughput
	$(PYTHON) -m benchmarks.input_pipeline
