# Two commands on a fresh clone: `make demo` runs the pipeline, `make test` runs the tests.
# Either creates .venv and installs the project into it on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Errors of a stage run by make name the make variables (CACHE=...) instead of the options they set (--cache ...).
MAKE_NAMES := --models=MODELS --model=MODELS --cache=CACHE --weights=WEIGHTS --precision=PRECISION \
	--backend=BACKEND --models-dir=MODELS_DIR --image-size=IMAGE_SIZE --calibration=DATA
models quantize extract fit classify report duplicates neighbors deploy demo doctor: export PIPELINE_MAKE_NAMES = $(MAKE_NAMES)
models: export PIPELINE_MAKE_NAMES += --out=MODELS_DIR
fit: export PIPELINE_MAKE_NAMES += --out=CLASSIFIERS_DIR
extract: export PIPELINE_MAKE_NAMES += @1=DATA
classify: export PIPELINE_MAKE_NAMES += @1=FOLDER
neighbors: export PIPELINE_MAKE_NAMES += @1=QUERY
deploy: export PIPELINE_MAKE_NAMES += @1=BUNDLE

MODELS ?= vgg16 resnet50
WEIGHTS ?=
IMAGE_SIZE ?=
MODELS_DIR ?= models
CACHE ?= features/embeddings.h5
DATA ?=
EXTRACT_ARGS ?=
CLASSIFIERS_DIR ?=
FIT_ARGS ?=
FOLDER ?=
QUERY ?=
CLASSIFY_ARGS ?=
BUNDLE ?=
DEPLOY_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
PRECISION ?= auto
BACKEND ?= local

.PHONY: help install lint test test-fast backbones models quantize extract fit classify report duplicates neighbors deploy demo doctor bench bench-ray bench-store bench-findings clean

help:
	@echo "make demo        run the pipeline end to end on built-in data"
	@echo "make test        run the test suite (make test-fast skips the slow parity tests)"
	@echo "make lint        ruff over the whole tree (the rules are in pyproject.toml)"
	@echo "make backbones   list the curated backbones (timm/..., torchvision/...): size, licence, published accuracy, speed here"
	@echo "make models      export ONNX backbones: MODELS='$(MODELS)' (or timm/NAME[.TAG], torchvision/NAME) WEIGHTS=pretrained|random|PATH|'resnet50=PATH vgg16=imagenet' IMAGE_SIZE= (default: the model's own)"
	@echo "make quantize DATA=folder PRECISION=int8   make the int8 (or fp16) variant of MODELS='$(MODELS)', calibrated on DATA"
	@echo "make extract DATA=folder   embed a folder (or CSV) into CACHE=$(CACHE) with MODELS='$(MODELS)' PRECISION=$(PRECISION) BACKEND=$(BACKEND)"
	@echo "make fit         fit and compare classifiers on CACHE=$(CACHE), into models/classifiers/<store name> (FIT_ARGS=...)"
	@echo "make classify FOLDER=folder   predict every image with the best classifier fitted on CACHE=$(CACHE) (CLASSIFY_ARGS=...)"
	@echo "make report      make report.html of the fit on CACHE=$(CACHE) again, without fitting"
	@echo "make duplicates  groups of the same or nearly the same image in CACHE=$(CACHE): duplicates.html and .csv beside it"
	@echo "make neighbors QUERY=image|folder|csv   the 10 stored images most like each query, from CACHE=$(CACHE)"
	@echo "make deploy BUNDLE=models/classifiers/<store>/<model>-<classifier>.skops   one ONNX file, no pickle (DEPLOY_ARGS=...)"
	@echo "make doctor      can onnxruntime run on CUDA here; if not, the first thing missing and its fix"
	@echo "make bench       extraction speed and int8 fidelity side by side, writes benchmarks/bench.json (~25 min)"
	@echo "make bench-ray   extract on a local Ray instance vs locally, 1M/100M-image estimates from bench and bench-store (~5 min)"
	@echo "make bench-store what store runs cost at 10k, 100k and 1M images, and the driver's intake on Ray (~15 min, 15 GB disk)"
	@echo "make bench-findings  neighbor index, leaks, duplicates and recall at 100k and 1M rows (~40 min, 9 GB disk)"
	@echo "make install     only create $(VENV) and install the project"
	@echo "make clean       remove $(VENV) (models/ and features/ are kept)"

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(INSTALLED)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

test: $(INSTALLED)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

backbones: $(INSTALLED)
	$(PY) -m pipeline.models

models: $(INSTALLED)
	$(PY) -m pipeline.export --model $(MODELS) --weights $(or $(WEIGHTS),pretrained) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) --out $(MODELS_DIR)

quantize: $(INSTALLED)
	@test -n "$(DATA)" || { echo "error: say which images to calibrate on: make quantize DATA=path/to/folder PRECISION=int8."; exit 2; }
	$(PY) -m pipeline.quantize --model $(MODELS) --precision $(if $(filter auto,$(PRECISION)),int8,$(PRECISION)) --calibration "$(DATA)" --models-dir $(MODELS_DIR)

extract: $(INSTALLED)
	@test -n "$(DATA)" || { echo "error: say which images to embed: make extract DATA=path/to/folder (or a CSV file)."; exit 2; }
	$(PY) -m pipeline.extract "$(DATA)" --models $(MODELS) --cache $(CACHE) --models-dir $(MODELS_DIR) $(if $(WEIGHTS),--weights $(WEIGHTS)) --precision $(PRECISION) --backend $(BACKEND) $(EXTRACT_ARGS)

fit: $(INSTALLED)
	$(PY) -m pipeline.fit --cache $(CACHE) $(if $(CLASSIFIERS_DIR),--out $(CLASSIFIERS_DIR)) $(FIT_ARGS)

classify: $(INSTALLED)
	@test -n "$(FOLDER)" || { echo "error: say which images to classify: make classify FOLDER=path/to/folder (CACHE=store for its classifiers)."; exit 2; }
	$(PY) -m pipeline.classify "$(FOLDER)" --cache $(CACHE) --models-dir $(MODELS_DIR) $(CLASSIFY_ARGS)

report: $(INSTALLED)
	$(PY) -m pipeline.report $(CACHE)

duplicates: $(INSTALLED)
	$(PY) -m pipeline.report.duplicates --cache $(CACHE)

neighbors: $(INSTALLED)
	@test -n "$(QUERY)" || { echo "error: say which images to search for: make neighbors QUERY=path/to/image (or a folder, or a CSV)."; exit 2; }
	$(PY) -m pipeline.serve.neighbors "$(QUERY)" --cache $(CACHE) --models-dir $(MODELS_DIR)

deploy: $(INSTALLED)
	@test -n "$(BUNDLE)" || { echo "error: say which classifier: make deploy BUNDLE=models/classifiers/<store>/<model>-<classifier>.skops."; exit 2; }
	$(PY) -m pipeline.deploy "$(BUNDLE)" --models-dir $(MODELS_DIR) $(DEPLOY_ARGS)

demo: $(INSTALLED)
	$(PY) -m pipeline.demo --models-dir $(MODELS_DIR) --precision $(PRECISION) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE))

doctor: $(INSTALLED)
	$(PY) -m pipeline.doctor

bench: $(INSTALLED)
	$(PY) benchmarks/bench_extract.py $(BENCH_ARGS)

bench-ray: $(INSTALLED)
	$(PY) benchmarks/bench_ray.py $(BENCH_ARGS)

bench-store: $(INSTALLED)
	PYTHONPATH=benchmarks $(PY) benchmarks/bench_store.py $(BENCH_ARGS)

bench-findings: $(INSTALLED)
	PYTHONPATH=benchmarks $(PY) benchmarks/bench_findings.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
