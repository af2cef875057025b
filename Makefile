# Quickstart: `make bench` (parity check + benchmark table) and `make test`.
# Each target installs only what is missing. An importable torch is never
# replaced (a GPU machine's CUDA build must stay); without one we install the
# CPU wheel torch==2.13.0.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
BUILT := build/.fused_bn_built
NVCC ?= $(shell command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
# tools/cuda_toolkit.py: CUDA_HOME, else the toolkit of the nvcc on PATH (a wrapper script too)
CUDA_INCLUDE ?= $(patsubst %/cuda_runtime.h,%,$(firstword $(wildcard $(shell $(PYTHON) tools/cuda_toolkit.py \
	2>/dev/null)/include/cuda_runtime.h)))

.PHONY: deps test-deps zoo-deps bench-deps build test test-emulated planted-faults bench cuda-check clean

deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@# --no-build-isolation builds with what is installed: a fresh venv may lack setuptools, and a
	@# setuptools before 70.1 builds wheels only with the wheel package (newer ones vendor it)
	@$(PYTHON) -c "import setuptools, wheel" 2>/dev/null || $(PIP) install "setuptools>=64" wheel
	@$(PYTHON) -c "import ninja" 2>/dev/null || $(PIP) install ninja || true

test-deps: deps zoo-deps
	@$(PYTHON) -c "import pytest, hypothesis, expecttest" 2>/dev/null || $(PIP) install pytest hypothesis expecttest
	@$(PYTHON) -c "import sklearn, matplotlib, tqdm" 2>/dev/null || $(PIP) install scikit-learn matplotlib tqdm

# The model zoo (bench/zoo.py): torchvision 0.28.0 is built for exactly torch
# 2.13.0, so it is installed only beside that torch, with --no-deps (as timm)
# so torch is never replaced; elsewhere the zoo tests and benchmark skip.
ZOO_TORCH := 2.13.0
# installed, without importing (the index's torchvision needs bench/zoo.py's help to import)
FIND_SPEC := import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)
zoo-deps: deps
	@if $(PYTHON) -c "import torch, sys; sys.exit(not torch.__version__.startswith('$(ZOO_TORCH)'))"; then \
		$(PYTHON) -c "$(FIND_SPEC)" torchvision || $(PIP) install --no-deps torchvision==0.28.0; \
		$(PYTHON) -c "$(FIND_SPEC)" timm || $(PIP) install --no-deps timm; \
		$(PYTHON) -c "import PIL, numpy, yaml, safetensors, huggingface_hub" 2>/dev/null || \
			$(PIP) install pillow numpy pyyaml safetensors huggingface_hub; \
	else echo "zoo-deps: torch is not $(ZOO_TORCH); the torchvision/timm zoo is skipped"; fi

bench-deps: deps zoo-deps
	@$(PYTHON) -c "import matplotlib, tqdm" 2>/dev/null || $(PIP) install matplotlib tqdm

$(BUILT): $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

# Rebuild when a source changed or when the installed extension does not import.
build: deps
	@$(PYTHON) -c "import fused_bn" 2>/dev/null || rm -f $(BUILT)
	@$(MAKE) --no-print-directory $(BUILT)

test: test-deps build
	$(PYTHON) -m pytest -q --durations=15 tests
	@$(MAKE) --no-print-directory test-emulated

# Our CUDA glue and kernels on the emulated GPU (tests/emulated_cuda.py): the
# suites below once more, with CPU tensors served by the CUDA kernels (built
# with gcov), the kernel layer's line coverage; then tools/cuda_smoke.py (what
# a GPU session runs under compute-sanitizer) alone, which must reach every
# line of the kernel layer; then a sanitized build (ASan + UBSan, Python under
# LD_PRELOAD) on a focused subset: that smoke run (every kernel line), the
# emulator's and the validation tests, and every activation's parity once.
EMULATED_TESTS := tests/test_parity.py tests/test_ops.py tests/test_fused_relu.py tests/test_sync.py tests/test_validation.py tests/test_family.py \
	tests/test_reliability.py tests/test_properties.py tests/test_emulation.py tests/test_activations.py \
	tests/test_traffic.py
SANITIZED_TESTS := tests/test_emulation.py tests/test_validation.py
ASAN_PRELOAD = $(shell $(CXX) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libstdc++.so)

test-emulated: test-deps build
	@rm -f build/fused_bn_emulated_cuda_coverage/*.gcda
	FUSED_BN_EMULATED_CUDA=1 FUSED_BN_EMULATION_COVERAGE=1 $(PYTHON) -m pytest -q --durations=15 $(EMULATED_TESTS)
	$(PYTHON) tools/emulation_coverage.py --min 95
	@rm -f build/fused_bn_emulated_cuda_coverage/*.gcda
	FUSED_BN_EMULATION_COVERAGE=1 $(PYTHON) tools/cuda_smoke.py emulated
	$(PYTHON) tools/emulation_coverage.py --min 100
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 \
		FUSED_BN_EMULATION_VARIANT=asan $(PYTHON) tools/cuda_smoke.py emulated
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 FUSED_BN_EMULATED_CUDA=1 \
		FUSED_BN_EMULATION_VARIANT=asan $(PYTHON) -m pytest -q --durations=15 --capture=sys $(SANITIZED_TESTS)
	@# every activation x residual x precision once (the emulated subset), sanitized
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 FUSED_BN_EMULATED_CUDA=1 \
		FUSED_BN_EMULATION_VARIANT=asan $(PYTHON) -m pytest -q --capture=sys tests/test_activations.py -k parity

# Each planted fault (tools/planted_faults.py) must be caught by the emulated suite.
planted-faults: test-deps build
	$(PYTHON) tools/planted_faults.py

bench: bench-deps build
	$(PYTHON) -m bench.run
	$(PYTHON) -m bench.blocks
	$(PYTHON) -m bench.sync
	$(PYTHON) -m bench.models
	@# without a GPU: the CUDA kernels' memory traffic on the emulated GPU, and a PREDICTED H100/H200 table
	@if $(PYTHON) -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then $(PYTHON) -m bench.traffic; fi

clean:
	rm -rf build fused_bn/*.so *.egg-info

# Compile the CUDA kernel layer for sm_80 and sm_90 (no GPU needed) with the
# flags torch.utils.cpp_extension builds extensions with, print ptxas's
# resource report per kernel, and fail on any spill or on a stack frame in a
# hot kernel (tools/cuda_check.py); read the sm_90 SASS and fail where a hot
# kernel's 16-byte vector path issues no 128-bit global loads/stores
# (tools/sass_check.py); then check that the torch glue compiles
# (syntax and types: a CPU torch ships the c10/cuda headers, not the libraries).
CUDA_CHECK_FLAGS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	-Xptxas -v -O3 -std=c++17 -DFUSED_BN_WITH_CUDA \
	-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
	-D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr

# The kernel layer's translation units (one per pass family; nvcc builds them in parallel).
CUDA_UNITS := forward backward

cuda-check:
	@test -n "$(NVCC)" || { echo "cuda-check: nvcc not found (PATH or /usr/local/cuda/bin)" >&2; exit 1; }
	@mkdir -p build/cuda-check
	@for unit in $(CUDA_UNITS); do \
		$(PYTHON) tools/cuda_check.py --nvcc "$(NVCC)" --source csrc/cuda/$$unit.cu \
			--output build/cuda-check/$$unit.o -- $(CUDA_CHECK_FLAGS) || exit 1; \
	done
	@# The SASS nvcc emitted (tools/sass_check.py): every 16-byte vector path of a hot kernel must
	@# issue LDG.E.128 (and STG.E.128 where it writes a tensor). cuobjdump and the nvdisasm it runs
	@# come from the toolkit, PATH, or the pip wheels, installed only when none is found.
	@$(PYTHON) -c "import sys; sys.path.insert(0, 'tools'); import sass_check as s; \
		sys.exit(0 if s.find_tool('cuobjdump', '$(NVCC)') and s.find_tool('nvdisasm', '$(NVCC)') else 1)" \
		|| $(PIP) install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm || true
	@$(PYTHON) tools/sass_check.py --nvcc "$(NVCC)" --arch sm_90 $(foreach unit,$(CUDA_UNITS),build/cuda-check/$(unit).o); \
		rc=$$?; if [ $$rc -eq 3 ]; then \
		echo "cuda-check: ************************************************************************" >&2; \
		echo "cuda-check: SASS CHECK SKIPPED: no cuobjdump/nvdisasm and pip could not install them" >&2; \
		echo "cuda-check: (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm); 128-bit accesses NOT verified" >&2; \
		echo "cuda-check: ************************************************************************" >&2; \
		elif [ $$rc -ne 0 ]; then exit $$rc; fi
	@echo "cuda-check: the torch glue (csrc/cuda/batch_norm_cuda.cpp), syntax only, against torch's headers"
	@test -n "$(CUDA_INCLUDE)" || { echo "cuda-check: no CUDA include directory (set CUDA_HOME)" >&2; exit 1; }
	@$(CXX) -std=c++20 -fsyntax-only -DFUSED_BN_WITH_CUDA -Icsrc -I"$(CUDA_INCLUDE)" \
		$$($(PYTHON) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))") \
		csrc/cuda/batch_norm_cuda.cpp
