# memascend — set-up, tests, demo and benchmarks.
#
# `make demo` and `make test` do all the set-up on a fresh machine: system packages when
# missing (as root; otherwise they print what to run), a .venv, torch (pinned to the CPU
# build that lies on this machine's disk), and the package with its native build. The
# install step is idempotent and fast when nothing changed (a stamp file tracks inputs).

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.memascend-installed
NATIVE_SRC := $(wildcard native/*.c native/*.h) memascend/_native/build.py setup.py pyproject.toml
SYS_PKGS := liburing-dev

.PHONY: install sysdeps demo test test-python native-test asan bench ds-ops clean

install: sysdeps $(STAMP)

sysdeps:
	@missing=""; for p in $(SYS_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "note: missing system packages:$$missing; run: sudo apt-get install -y$$missing"; \
	    echo "      (without liburing-dev the io_uring backend is not built; the portable one is used)"; \
	  fi; \
	fi

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VPY) $(NATIVE_SRC)
	$(VPY) -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(VPY) -m pip install -q --disable-pip-version-check setuptools wheel "cffi>=1.15"
	$(VPY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev,transformers,deepspeed]"
	$(VPY) -c "import memascend._native._lib"
	@# optional pyuring backend: its sdist cannot build against Debian's liburing 2.3, but it
	@# ships a prebuilt library; this installs that offline (MACHINE.md). Failure is not fatal.
	@$(VPY) -c "import pyuring" 2>/dev/null || \
	  (cd /tmp && CC="sh -c 'cp pyuring/lib/liburingwrap.so build/liburingwrap.so' --" \
	   $(CURDIR)/$(VPY) -m pip install -q --disable-pip-version-check --no-cache-dir "pyuring==0.3.3" \
	   >/dev/null 2>&1 && echo "installed optional pyuring backend") || \
	  echo "note: optional pyuring backend not installed; its tests will skip"
	@touch $(STAMP)

demo: install
	$(VENV)/bin/memascend demo $(DEMO_ARGS)

native-test:
	$(MAKE) -s -C native test

asan:
	$(MAKE) -s -C native asan

test-python: install
	$(VPY) -m pytest -q

test: install native-test asan test-python

# Stock DeepSpeed as a benchmark competitor (bench/zero_infinity.py, estimate_accuracy.py,
# io_throughput.py): libaio and DeepSpeed's async_io and cpu_adam ops, JIT-built once into
# $(DS_EXT_DIR) (~10 min on 2 cores; a no-op when cached). The library never needs these.
DS_EXT_DIR ?= $(HOME)/.cache/memascend-torch-ext
ds-ops: install
	@dpkg -s libaio-dev >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages: libaio-dev"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev >/dev/null; \
	  else echo "note: run: sudo apt-get install -y libaio-dev" >&2; exit 1; fi; }
	TORCH_EXTENSIONS_DIR=$(DS_EXT_DIR) $(VPY) -c "from deepspeed.ops.op_builder import \
	  AsyncIOBuilder, CPUAdamBuilder; AsyncIOBuilder().load(verbose=False); \
	  CPUAdamBuilder().load(verbose=False); print('DeepSpeed ops built in $(DS_EXT_DIR)')"

# The benchmarks behind bench/RESULTS.md (I/O-heavy: several minutes; JSON under bench/out/).
bench: install
	mkdir -p bench/out
	$(VPY) bench/pool_overhead.py --json bench/out/pool_overhead.json
	$(VPY) bench/io_throughput.py --json bench/out/io_throughput.json
	$(VPY) bench/swapper.py --json bench/out/swapper.json

clean:
	$(MAKE) -s -C native clean
	rm -rf build memascend/_native/_lib*.so memascend/_native/*.c memascend/_native/*.o *.egg-info
