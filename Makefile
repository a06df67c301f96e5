# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; pip finds it before anything pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench clean browser default-model

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Index Flickr8k's 1,000 test photos with the shipped default model, search them, score it.
demo: install
	$(BIN)/cbir demo

# Retrain the shipped default model (src/cbir/models/default) from ../shared; same seed, same weights.
FLICKR8K ?= ../shared/datasets/flickr8k
default-model: install
	$(BIN)/python tools/default_model.py --dataset $(FLICKR8K)
	$(BIN)/cbir calibrate --model zero-shot --dataset $(FLICKR8K)

# The browser test (tests/test_server.py -k chromium) drives Debian's chromium, installed here when missing. Where
# apt-get cannot install it (no root, no apt), the build goes on and that test skips, saying why.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
		|| echo "WARNING: could not install chromium; the browser test will be skipped"

test: install browser
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

clean:
	rm -rf $(VENV) build dist src/*.egg-info
