# One entry point. Every target creates .venv and installs what is missing first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision as pinned for this project's machines (a CUDA 13.0 build that also runs on CPUs).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all bench bench-compare bench-report bench-model gpu-check clean FORCE

$(PY):
	@echo "== creating $(VENV) (a few seconds)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel ninja

$(VENV)/.deps: $(PY) pyproject.toml
	@echo "== installing torch, torchvision and the test tools into $(VENV) (about a minute; once)"
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q pytest pytest-benchmark hypothesis timm numpy scikit-learn tqdm matplotlib \
		onnx onnxscript onnxruntime
	touch $@

# The build's inputs besides its sources: the torch version and the build switches
# (see setup.py). The stamp changes only when one of them does, so that a second make
# target rebuilds nothing when nothing changed.
BUILD_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
BUILD_SWITCHES = EFFNET_FAST_BUILD_CUDA=$(EFFNET_FAST_BUILD_CUDA) EFFNET_FAST_NO_EXT=$(EFFNET_FAST_NO_EXT) \
	EFFNET_FAST_PORTABLE=$(EFFNET_FAST_PORTABLE) EFFNET_FAST_DEV=$(EFFNET_FAST_DEV) \
	TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) CUDA_HOME=$(CUDA_HOME)

$(VENV)/.build-config: $(VENV)/.deps FORCE
	@echo "torch=$$($(PY) -c 'import importlib.metadata as m; print(m.version("torch"))') $(BUILD_SWITCHES)" > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(VENV)/.installed: $(VENV)/.build-config $(BUILD_SOURCES)
	@echo "== building the C++ and CUDA extensions and installing effnet_fast (first build 3-6 minutes on"
	@echo "   2 cores; later builds recompile only what changed); compiler output in $(VENV)/build.log"
	@start=$$(date +%s); \
	if $(PY) -m pip install --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1; then \
		echo "   done in $$(( $$(date +%s) - start )) s"; \
	else \
		echo "build failed; the last lines of $(VENV)/build.log:"; tail -n 40 $(VENV)/build.log; exit 1; \
	fi
	@touch $@

install: $(VENV)/.installed
	@$(PY) -m effnet_fast info

FORCE:

demo: install
	$(PY) -m effnet_fast summary
	$(PY) -m effnet_fast train
	$(PY) -m effnet_fast bench --batch 8 --channels-last

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

# The per-op and model benchmark suite (pytest-benchmark) on the CPU, saved under .benchmarks/;
# bench-compare reruns it against the last saved run; bench-report writes docs/PERFORMANCE.md's
# per-op tables and chart from the newest saved run.
BENCH_ARGS ?= benchmarks/ --benchmark-only -k cpu --benchmark-group-by=group --benchmark-columns=median,min,iqr,rounds

bench: install
	$(PY) -m pip install -q matplotlib
	$(PY) -m pytest $(BENCH_ARGS) --benchmark-autosave

bench-compare: install
	$(PY) -m pytest $(BENCH_ARGS) --benchmark-compare

bench-report: install
	$(PY) -m pip install -q matplotlib
	$(PY) benchmarks/report.py

bench-model: install
	$(PY) -m pip install -q onnx onnxscript onnxruntime openvino
	$(PY) benchmarks/bench_model.py --onnx --compile

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info effnet_fast/*.so .pytest_cache $(VENV)/.installed $(VENV)/.build-config
