# One entry point for set-up, the demo, the tests and the benchmarks.
#   make demo   set up, segment the sample test cases with the default model, score them
#   make test   set up, lint, run the test suite
#   make docker-test-cpu / docker-test   build the images on a Docker engine and check them (docker/test.sh)
# Works offline on a CPU machine that has the torch 2.13.0 wheel in pip's find-links, and on a CUDA
# node (pip then takes the CUDA build of the same torch from the registry). Add the CuPy kernels on a
# GPU node with: make setup EXTRAS=service,dev,ray,gpu

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
EXTRAS ?= service,dev,ray
BIN := $(VENV)/bin
DEMO_OUT ?= out/demo
WEB := app/service/web

.PHONY: setup demo test lint bench clean docker-test docker-test-cpu

setup: $(VENV)/.installed $(WEB)/node_modules/.package-lock.json

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	# RTSTRUCT: rt-utils declares the GUI OpenCV, which clashes with the headless build: install it without deps
	$(BIN)/python -m pip install --quiet "opencv-python-headless>=4.8" && \
	    $(BIN)/python -m pip install --quiet --no-deps "rt-utils==1.2.7"
	touch $@

# The results page's viewer: NiiVue, pinned in $(WEB)/package-lock.json, from the npm registry once (then
# offline); the service serves it from $(WEB)/node_modules. Without npm the page at / says how to install it.
$(WEB)/node_modules/.package-lock.json: $(WEB)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix $(WEB) --ignore-scripts --no-audit --no-fund --loglevel=error; \
	else echo "warning: npm is missing (apt-get install npm): the results page at / will be unavailable" >&2; fi

demo: setup
	$(BIN)/tessera models
	$(BIN)/tessera segment sample_data/imagesTs -o $(DEMO_OUT)
	$(BIN)/tessera evaluate --pred $(DEMO_OUT) --truth sample_data/labelsTs --labels sample_data/dataset.json

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy app models pipelines bench

# pydicom-seg (a second SEG reader for the tests) is unmaintained and needs pydicom 2 / numpy 1: own venv.
SEG_VENV := .venv-pydicom-seg
$(SEG_VENV)/.installed:
	$(PYTHON) -m venv $(SEG_VENV)
	$(SEG_VENV)/bin/python -m pip install --quiet "pydicom>=2.4,<3" "numpy<2" "pydicom-seg==0.4.1" "SimpleITK>=2.3"
	touch $@

# mamba_ssm's own reference code (pure torch) for the scan/layer parity tests and bench/scan.py: its sdist built
# without the CUDA extension and without its deps (triton is not needed for the reference). The package itself
# never needs it: the scan has its own CPU and GPU backends.
MAMBA_SSM_VERSION ?= 2.3.2.post1
$(VENV)/.mamba-reference: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet "setuptools>=69" wheel packaging ninja
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(BIN)/python -m pip install --quiet --no-deps \
	    --no-build-isolation "mamba-ssm==$(MAMBA_SSM_VERSION)" \
	    || echo "warning: mamba-ssm could not be installed; its parity tests will skip" >&2
	touch $@

test: lint $(SEG_VENV)/.installed $(VENV)/.mamba-reference
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup $(VENV)/.mamba-reference
	$(BIN)/python bench/pipeline_stages.py
	$(BIN)/python bench/scan.py
	$(BIN)/python bench/families.py

# Build the images on a real Docker engine (own dockerd, base from Debian packages) and check them:
# docker/test.sh. CI runs the CPU part; the GPU image (several GB of CUDA wheels) is a manual target.
docker-test: setup
	PYTHON=$(BIN)/python docker/test.sh

docker-test-cpu: setup
	PYTHON=$(BIN)/python docker/test.sh --cpu

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
