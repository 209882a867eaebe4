# torchgc's two commands: `make demo` (the main job) and `make test` (every test). Both set
# everything up themselves: a virtual environment pinned by tests/constraints.txt, the op library
# built through CMake, and GoogleTest for the C++ tests.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := tests/constraints.txt
MAX_JOBS ?= 2
BUILD_DIR ?= build/cmake
export MAX_JOBS

# Everything the tests and the demo need; versions come from the constraints file.
TEST_DEPS := torch transformers peft accelerate trl datasets pytest hypothesis numpy matplotlib tqdm psutil cmake setuptools wheel deepspeed bitsandbytes ninja

# Transformers overlays: "#overlay NAME PINS..." lines of the constraints file (see there).
OVERLAY_DIR := $(VENV)/overlays
OVERLAYS := $(shell sed -n 's/^\#overlay \([^ ]*\) .*/\1/p' $(CONSTRAINTS))
overlay-pins = $(shell sed -n 's/^\#overlay $(1) //p' $(CONSTRAINTS))
PATCH_TESTS := $(wildcard tests/test_patch*.py)

.PHONY: venv gtest build test pytest ctest ctest-asan demo gpu-check clean overlays pytest-overlays FORCE

venv: $(VENV)/.installed
$(VENV)/.installed: $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) $(TEST_DEPS)
	touch $@

# GoogleTest for the C++ tests, from Debian's packages when it is not installed yet.
gtest:
	@test -f /usr/include/gtest/gtest.h || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libgtest-dev >/dev/null; \
	  else echo "make: GoogleTest is missing; install Debian's libgtest-dev (sudo apt-get install libgtest-dev)"; exit 1; fi; }

# The op library, in place (editable install), with the C++ tests built by the same CMake run.
build: venv gtest
	TORCHGC_BUILD_TESTS=ON TORCHGC_BUILD_DIR=$(BUILD_DIR) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

ctest: build
	cd $(BUILD_DIR) && ctest --output-on-failure --no-tests=error

# The C++ tests under AddressSanitizer + UBSan with leak detection, in their own build folder (CPU
# kernels only; the instrumented library is never installed into the package). Part of `make test`.
ctest-asan: venv gtest
	$(VENV)/bin/cmake -S . -B build/asan -DPython_EXECUTABLE=$(abspath $(PY)) -DTORCHGC_CUDA=OFF -DTORCHGC_BUILD_TESTS=ON -DTORCHGC_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
	$(VENV)/bin/cmake --build build/asan --parallel $(MAX_JOBS)
	cd build/asan && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure --no-tests=error

# The LLaMA-Factory overlay must exist: tests/test_llamafactory.py runs LLaMA-Factory with it.
pytest: build overlays
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# An overlay's .pins file changes only when its line in the constraints file does, so an
# installed overlay is reused until then.
$(OVERLAY_DIR)/%.pins: FORCE
	@mkdir -p $(OVERLAY_DIR)
	@echo '$(call overlay-pins,$*)' | cmp -s - $@ || echo '$(call overlay-pins,$*)' > $@

$(OVERLAY_DIR)/%/.installed: $(OVERLAY_DIR)/%.pins | venv
	rm -rf $(OVERLAY_DIR)/$*
	$(PY) -m pip install --quiet --no-deps --target $(OVERLAY_DIR)/$* $$(cat $<)
	touch $@

.PRECIOUS: $(OVERLAY_DIR)/%.pins $(OVERLAY_DIR)/%/.installed
overlays: $(OVERLAYS:%=$(OVERLAY_DIR)/%/.installed)

# The patch tests once more under each transformers overlay, after checking that its transformers
# is the one imported.
pytest-overlays: build overlays
	@for o in $(filter transformers-%,$(OVERLAYS)); do \
	  echo "== tests/test_patch*.py with $$o"; \
	  export PYTHONPATH=$(abspath $(OVERLAY_DIR))/$$o; \
	  $(PY) -c "import sys, transformers; v = transformers.__version__; sys.exit(None if v == '$${o#transformers-}' else '$$o: transformers ' + v + ' was imported')" || exit 1; \
	  $(PY) -m pytest -q -ra -p no:cacheprovider $(PATCH_TESTS) || exit 1; \
	done

test: ctest pytest pytest-overlays ctest-asan

# The main job: every strategy's memory and speed on the embedded default model, cut to 4 layers
# and 3 timed steps so it takes under 5 minutes on 2 cores (the full run: torchgc bench). The
# untimed step that measures the bytes saved for backward is the warm-up.
demo: build
	$(PY) -m torchgc bench --layers 4 --steps 3 --warmup 0 --out results

# Everything that needs a GPU, on a machine that already has torch, transformers and peft (no
# venv, no download): `make gpu-check PY=python3`. Builds in place for that GPU, runs the GPU
# tests and the op benchmarks, then the strategies on a 1B-class Llama (benchmarks/llama-gpu.json)
# at three depths, for offload's flat peak memory. Output lands in $(GPU_OUT).
GPU_OUT ?= results/gpu
GPU_LAYERS ?= 4 8 16
gpu-check:
	mkdir -p $(GPU_OUT)
	TORCH_CUDA_ARCH_LIST="$$($(PY) -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" \
	  TORCHGC_CUDA=ON $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -m pytest -q -ra -m cuda 2>&1 | tee $(GPU_OUT)/pytest-cuda.txt
	$(PY) benchmarks/run.py norm --device cuda 2>&1 | tee $(GPU_OUT)/norm.txt
	$(PY) benchmarks/run.py offload --device cuda 2>&1 | tee $(GPU_OUT)/offload.txt
	for layers in $(GPU_LAYERS); do \
	  $(PY) -m torchgc bench --device cuda --config benchmarks/llama-gpu.json --layers $$layers --seq-lens 2048,8192 \
	    --strategies none,hf,torchgc-checkpoint,torchgc-offload --no-freeze --quiet --out $(GPU_OUT)/layers-$$layers || exit 1; \
	done
