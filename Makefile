# One entry point. Every target creates .venv and installs what is missing first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision as pinned for this project's machines (a CUDA 13.0 build that also runs on CPUs).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all bench bench-model gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel ninja

$(VENV)/.deps: $(PY) pyproject.toml
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q pytest pytest-benchmark hypothesis timm numpy scikit-learn tqdm
	touch $@

install: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m effnet_fast info

demo: install
	$(PY) -m effnet_fast summary
	$(PY) -m effnet_fast train --epochs 6 --fused true
	$(PY) -m effnet_fast bench --batch 8 --size 224 --repeats 2 --channels-last

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

bench: install
	$(PY) benchmarks/bench_dwconv_bn_silu.py
	$(PY) benchmarks/bench_squeeze_excite.py
	$(PY) benchmarks/bench_bn_silu.py

bench-model: install
	$(PY) -m pip install -q onnx onnxscript onnxruntime openvino
	$(PY) benchmarks/bench_model.py --onnx --compile

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info effnet_fast/*.so .pytest_cache .benchmarks
