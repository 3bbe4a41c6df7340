# Every target creates its own virtual environment, so a fresh clone needs nothing but Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.confnb-installed

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# As root, the kernel's executor runs as nobody: it must be able to reach this Python.
	$(BIN)/python -m kernel_enclave.privileges --fix
	touch $@

demo: $(STAMP)
	$(BIN)/confnb demo

lint: $(STAMP)
	$(BIN)/ruff check confnb kernel_enclave tests benchmarks examples
	$(BIN)/ruff format --check confnb kernel_enclave tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy confnb kernel_enclave

test: lint typecheck
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@# Every benchmark runs; the target fails afterwards if any of them missed its target.
	status=0; for script in attest_verify dataset_ipc_load dataset_parquet_load broker_release kernel_roundtrip vault_ops; do \
		$(BIN)/python benchmarks/$$script.py || status=1; done; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
