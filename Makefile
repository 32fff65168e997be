# Set-up and entry points. Override TORCH for your hardware, e.g.
#   make test TORCH="torch==2.13.0"            (CPU wheel)
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Versions verified together; CONSTRAINTS= (empty) lets pip pick the newest that setup.py allows.
CONSTRAINTS ?= -c constraints.txt
BIN := $(VENV)/bin

.PHONY: venv install test demo demo-quick lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[train,score,metrics,test]"

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m diffusers_product2img.demo --output_dir demo_output

demo-quick: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m diffusers_product2img.demo --output_dir demo_output --quick

lint: install
	$(BIN)/ruff check src tests examples dataset_scripts benchmarks

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_pipeline_overhead.py
