# Two commands on a fresh clone: `make demo` runs the pipeline, `make test` runs the tests.
# Either creates .venv and installs the project into it on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

MODELS ?= vgg16 resnet50
WEIGHTS ?=
IMAGE_SIZE ?= 224
MODELS_DIR ?= models
CACHE ?= features/embeddings.h5
DATA ?=
EXTRACT_ARGS ?=
CLASSIFIERS_DIR ?= models/classifiers
FIT_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
PRECISION ?= auto
BACKEND ?= local

.PHONY: help install test test-fast models extract fit demo doctor bench bench-ray bench-store clean

help:
	@echo "make demo        run the pipeline end to end on built-in data"
	@echo "make test        run the test suite (make test-fast skips the slow parity tests)"
	@echo "make models      export ONNX backbones: MODELS='$(MODELS)' WEIGHTS=imagenet|random|PATH|'resnet50=PATH vgg16=imagenet' IMAGE_SIZE=$(IMAGE_SIZE)"
	@echo "make extract DATA=folder   embed a folder (or CSV) into CACHE=$(CACHE) with MODELS='$(MODELS)' PRECISION=$(PRECISION) BACKEND=$(BACKEND)"
	@echo "make fit         fit and compare classifiers on CACHE=$(CACHE) into CLASSIFIERS_DIR=$(CLASSIFIERS_DIR) (FIT_ARGS=...)"
	@echo "make doctor      can onnxruntime run on CUDA here; if not, the first thing missing and its fix"
	@echo "make bench       extraction speed and int8 fidelity side by side, writes benchmarks/bench.json (~25 min)"
	@echo "make bench-ray   extract on a local Ray instance vs locally, 1M/100M-image estimates from bench and bench-store (~5 min)"
	@echo "make bench-store what store runs cost at 10k, 100k and 1M images, and the driver's intake on Ray (~15 min, 15 GB disk)"
	@echo "make install     only create $(VENV) and install the project"
	@echo "make clean       remove $(VENV) (models/ and features/ are kept)"

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

models: $(INSTALLED)
	$(PY) -m pipeline.export --model $(MODELS) --weights $(or $(WEIGHTS),imagenet) --image-size $(IMAGE_SIZE) --out $(MODELS_DIR)

extract: $(INSTALLED)
	@test -n "$(DATA)" || { echo "error: say which images to embed: make extract DATA=path/to/folder (or a CSV file)."; exit 2; }
	$(PY) -m pipeline.extract "$(DATA)" --models $(MODELS) --cache $(CACHE) --models-dir $(MODELS_DIR) $(if $(WEIGHTS),--weights $(WEIGHTS)) --precision $(PRECISION) --backend $(BACKEND) $(EXTRACT_ARGS)

fit: $(INSTALLED)
	$(PY) -m pipeline.fit --cache $(CACHE) --out $(CLASSIFIERS_DIR) $(FIT_ARGS)

demo: $(INSTALLED)
	$(PY) -m pipeline.demo --models-dir $(MODELS_DIR) --precision $(PRECISION)

doctor: $(INSTALLED)
	$(PY) -m pipeline.doctor

bench: $(INSTALLED)
	$(PY) benchmarks/bench_extract.py $(BENCH_ARGS)

bench-ray: $(INSTALLED)
	$(PY) benchmarks/bench_ray.py $(BENCH_ARGS)

bench-store: $(INSTALLED)
	PYTHONPATH=benchmarks $(PY) benchmarks/bench_store.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
