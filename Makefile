# torchgc's two commands: `make demo` (the main job) and `make test` (every test). Both set
# everything up themselves: a virtual environment pinned by tests/constraints.txt, the op libraries
# built through CMake, and GoogleTest for the C++ tests. `make wheel` builds the wheel alone.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
CONSTRAINTS := tests/constraints.txt
MAX_JOBS ?= 2
BUILD_DIR ?= build/cmake
export MAX_JOBS

# What building the wheel needs (nvidia-cuda-crt: the CUDA headers a build without nvcc compiles
# the CUDA offload kernels with), and everything the tests and the demo need; versions come from
# the constraints file.
BUILD_DEPS := torch cmake setuptools wheel nvidia-cuda-crt
TEST_DEPS := torch transformers peft accelerate trl datasets pytest hypothesis numpy matplotlib tqdm psutil cmake setuptools wheel deepspeed bitsandbytes ninja

# Transformers overlays: "#overlay NAME PINS..." lines of the constraints file (see there).
OVERLAY_DIR := $(VENV)/overlays
OVERLAYS := $(shell sed -n 's/^\#overlay \([^ ]*\) .*/\1/p' $(CONSTRAINTS))
overlay-pins = $(shell sed -n 's/^\#overlay $(1) //p' $(CONSTRAINTS))
PATCH_TESTS := $(wildcard tests/test_patch*.py) tests/test_exactness.py tests/test_trl_edge_cases.py

.PHONY: venv build-venv gtest wheel build test pytest ctest ctest-asan test-wheel demo gpu-check clean overlays pytest-overlays FORCE

venv: $(VENV)/.installed
$(VENV)/.installed: $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) $(BUILD_DEPS) $(TEST_DEPS)
	touch $@

build-venv: $(VENV)/.build-installed
$(VENV)/.build-installed: $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) $(BUILD_DEPS)
	touch $@

# GoogleTest for the C++ tests, from Debian's packages when it is not installed yet.
gtest:
	@test -f /usr/include/gtest/gtest.h || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libgtest-dev >/dev/null; \
	  else echo "make: GoogleTest is missing; install Debian's libgtest-dev (sudo apt-get install libgtest-dev)"; exit 1; fi; }

# The wheel, dist/torchgc-<version>-py3-none-<platform>.whl: one build for every torch from 2.11 on
# (csrc/README.md). Its CMake folder is the development build's, so `make test` compiles once.
wheel: build-venv
	rm -f dist/torchgc-*.whl
	TORCHGC_BUILD_DIR=$(BUILD_DIR) $(PY) -m pip wheel --quiet --no-build-isolation --no-deps . -w dist
	@ls dist/torchgc-*.whl

# The op libraries in place (editable install), with the C++ tests built by the same CMake run.
build: venv gtest
	TORCHGC_BUILD_TESTS=ON TORCHGC_BUILD_DIR=$(BUILD_DIR) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

ctest: build
	cd $(BUILD_DIR) && ctest --output-on-failure --no-tests=error

# The C++ tests under AddressSanitizer + UBSan with leak detection, in their own build folder (the
# instrumented libraries are never installed into the package). Part of `make test`. Its CUDA
# library is built as where no nvcc is installed (TORCHGC_CUDA_NORMS=OFF): the offload kernels
# alone, from pip's CUDA headers, which the check after the build confirms.
ctest-asan: venv gtest
	$(VENV)/bin/cmake -S . -B build/asan -DPython_EXECUTABLE=$(PY) -DTORCHGC_CUDA_NORMS=OFF -DTORCHGC_BUILD_TESTS=ON -DTORCHGC_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
	$(VENV)/bin/cmake --build build/asan --parallel $(MAX_JOBS)
	$(PY) -c "import json, torch, pathlib; b = json.loads(pathlib.Path('build/asan/_build.json').read_text()); \
	  assert b['cuda'] == torch.version.cuda and not b['cuda_norm'] and pathlib.Path('build/asan/_C_cuda.so').exists(), b; \
	  print('ctest-asan: the CUDA library built without nvcc:', b)"
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

# The patch and exactness tests once more under each transformers overlay, after checking that
# its transformers is the one imported.
pytest-overlays: build overlays
	@for o in $(filter transformers-%,$(OVERLAYS)); do \
	  echo "== $(PATCH_TESTS) with $$o"; \
	  export PYTHONPATH=$(abspath $(OVERLAY_DIR))/$$o; \
	  $(PY) -c "import sys, transformers; v = transformers.__version__; sys.exit(None if v == '$${o#transformers-}' else '$$o: transformers ' + v + ' was imported')" || exit 1; \
	  $(PY) -m pytest -q -ra -p no:cacheprovider $(PATCH_TESTS) || exit 1; \
	done

# The wheel in fresh environments, one per torch release it serves: the op tests and
# tests/test_wheel.py (symbols, loading, a patch() training step) in each (tests/wheel_venvs.py).
WHEEL_TORCHES ?= 2.11.0 2.12.0 2.13.0+cpu 2.14.1
test-wheel: wheel venv
	$(PY) tests/wheel_venvs.py $$(ls dist/torchgc-*.whl) $(WHEEL_TORCHES)

test: ctest pytest pytest-overlays test-wheel ctest-asan

# The main job: every strategy's memory and speed on the embedded default model, cut to 4 layers
# and 3 timed steps so it takes under 5 minutes on 2 cores (the full run: torchgc bench). The
# untimed step that measures the bytes saved for backward is the warm-up.
demo: build
	$(PY) -m torchgc bench --layers 4 --steps 3 --warmup 0 --out results

# Everything that needs a GPU, on a machine that already has torch, transformers and peft (no
# venv, no download): `make gpu-check PY=python3`, or `make gpu-check PY=python3 WHEEL=dist/...whl`
# to test a built wheel instead of building in place for that GPU. Runs the GPU tests (from a
# scratch folder with a wheel, so the installed package is the one imported) and the op
# benchmarks, then the strategies on a 1B-class Llama (benchmarks/llama-gpu.json) at three depths,
# for offload's flat peak memory. Output lands in $(GPU_OUT).
GPU_OUT ?= results/gpu
GPU_LAYERS ?= 4 8 16
WHEEL ?=
GPU_RUN = cd $$(mktemp -d) &&
gpu-check:
	mkdir -p $(GPU_OUT)
	if [ -n "$(WHEEL)" ]; then $(PY) -m pip install --quiet --no-deps --force-reinstall $(WHEEL); else \
	  TORCHGC_CUDA_ARCHS="$$($(PY) -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')" \
	  TORCHGC_CUDA=ON $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .; fi
	$(GPU_RUN) $(PY) -m pytest -q -ra -m cuda --rootdir $(CURDIR) $(CURDIR)/tests 2>&1 | tee $(abspath $(GPU_OUT))/pytest-cuda.txt
	$(GPU_RUN) $(PY) $(CURDIR)/benchmarks/run.py norm --device cuda 2>&1 | tee $(abspath $(GPU_OUT))/norm.txt
	$(GPU_RUN) $(PY) $(CURDIR)/benchmarks/run.py offload --device cuda 2>&1 | tee $(abspath $(GPU_OUT))/offload.txt
	for layers in $(GPU_LAYERS); do \
	  $(GPU_RUN) $(PY) -m torchgc bench --device cuda --config $(CURDIR)/benchmarks/llama-gpu.json --layers $$layers --seq-lens 2048,8192 \
	    --strategies none,hf,torchgc-checkpoint,torchgc-offload --no-freeze --quiet --out $(abspath $(GPU_OUT))/layers-$$layers || exit 1; \
	done
