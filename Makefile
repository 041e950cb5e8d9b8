# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv and install everything on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint faults clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip<26.2"
	# torch first, pinned to the releases these machines carry (CPU use; a CUDA build on x86_64).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev,interop,fast]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/mmssl demo --out runs/demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m ""

faults: $(BIN)/.installed
	MMSSL_FAULTS_FULL=1 $(BIN)/python -m pytest -q -m "" tests/faults

bench: $(BIN)/.installed
	$(BIN)/python bench/run_all.py

lint: $(BIN)/.installed
	$(BIN)/ruff check mmssl tests bench tokenizer
	$(BIN)/ruff format --check mmssl tests bench tokenizer
	$(BIN)/python -m mypy mmssl

clean:
	rm -rf $(VENV) build *.egg-info
