# The two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV    ?= .venv
PY      := $(VENV)/bin/python
GEN     := $(VENV)/bin/gen
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup test demo models lint clean bench bench-full bench-setup gpu-check docs perf-analyzer

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in the train extra: that build installs from local disk, CPU only
	$(PY) -m pip install -q -e ".[train,serve,dev]"
	touch $(STAMP)

setup: $(STAMP)

test: setup perf-analyzer
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) -m gen.demo

# Retrain and re-export the shipped models (README's table of training times adds up to about 4 hours on 2 CPU cores),
# then score them: `gen eval --check` fails the target when a model misses its quality bar. The second eval is the
# teacher at the server's default sampler, for the student's comparison (README, "Few-step students"); the last, where
# the student shipped with an int8 variant, scores it served at int8 (docs/export.md).
models: setup
	$(PY) -m gen.defaults
	$(GEN) eval mnist-diffusion --sampler unipc --steps 10 --json docs/teacher-quality.json
	$(GEN) eval --check --json docs/quality.json
	if grep -q '"int8"' exported/mnist-diffusion-student/1/manifest.json; then \
		$(GEN) eval mnist-diffusion-student --precision int8 --check --json docs/quality-int8.json; fi

# Side-by-side benchmarks -> BENCHMARKS.md and bench/plots/ (see bench/__main__.py).
# `make bench` is the quick mode (about ten minutes); `make bench-full` (or MODE=full) the full tables.
MODE ?= quick
PYTRITON := bench/.venv-pytriton
BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[train,serve,dev,bench]"
	touch $(BENCH_STAMP)

# PyTriton needs numpy < 2: its own environment, patched for this Python (bench/pytriton_patch.py); onnx because
# bench/pytriton_server.py takes the session options from serve.session, which imports it.
# A failure here is not fatal: the report then says why PyTriton was not measured.
$(PYTRITON)/.stamp:
	-python3 -m venv $(PYTRITON) && $(PYTRITON)/bin/pip install -q "nvidia-pytriton==0.7.0" onnxruntime onnx \
		&& $(PYTRITON)/bin/python bench/pytriton_patch.py && touch $@

# Triton's load generator, perf_analyzer (tests/serve/test_perf_analyzer.py): tritonclient 2.41's wheel ships the
# binary, in a venv of its own (the dev extra's tritonclient is newer); it loads libcudart.so.12, even against a CPU
# server (from the nvidia-cuda-runtime-cu12 wheel), and libb64 (apt-get install libb64-0d, as .ci/run does).
# Not fatal: without it the test says why it skips.
PERF := .venv-perf
$(PERF)/.stamp:
	-python3 -m venv $(PERF) && $(PERF)/bin/pip install -q --no-deps "tritonclient==2.41.0" nvidia-cuda-runtime-cu12 \
		&& touch $@

perf-analyzer: $(PERF)/.stamp

bench-setup: $(BENCH_STAMP) $(PYTRITON)/.stamp

bench: bench-setup
	$(PY) -m bench --mode $(MODE)

bench-full:
	$(MAKE) bench MODE=full

# On a machine with an NVIDIA GPU: swap in the CUDA onnxruntime wheel (the gpu extra; the CPU wheel cannot stay
# beside it), run the gpu-marked tests (CUDA vs CPU parity, CUDA graphs) and print step times per batch-size bucket
# with and without CUDA graphs. That .venv keeps the CUDA wheel afterwards (it serves CPU models too).
gpu-check: setup
	$(PY) -m pip uninstall -q -y onnxruntime
	$(PY) -m pip install -q -e ".[train,gpu,dev]"
	$(PY) -m pytest -m gpu -s -q tests/serve/test_gpu.py
	$(PY) -m bench.gpu_check

# The documentation site from docs/ (mkdocs.yml) into site/; strict: a broken link or a page left out fails.
DOCS_STAMP := $(VENV)/.docs-stamp

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs .pytest_cache bench/.cache $(PYTRITON) site
