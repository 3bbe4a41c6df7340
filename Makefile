# Every target creates its own virtual environment, so a fresh clone needs nothing but Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.confnb-installed
# jlpm's package scripts call jlpm again, so the venv's bin must be on PATH for them.
JLPM   := cd labextension && PATH="$(abspath $(BIN)):$$PATH" jlpm

.PHONY: demo test lint typecheck bench docs browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# The editable install copied the built lab extension; a link instead lets `jlpm build` take effect on reload.
	rm -rf $(VENV)/share/jupyter/labextensions/confnb-lab
	ln -s $(abspath confnb/server/labextension) $(VENV)/share/jupyter/labextensions/confnb-lab
	@# As root, the kernel's executor runs as nobody: it must be able to reach this Python.
	$(BIN)/python -m kernel_enclave.privileges --fix
	touch $@

demo: $(STAMP)
	$(BIN)/confnb demo

lint: $(STAMP)
	$(BIN)/ruff check confnb kernel_enclave tests benchmarks examples
	$(BIN)/ruff format --check confnb kernel_enclave tests benchmarks examples
	$(JLPM) lint:check

typecheck: $(STAMP)
	$(BIN)/mypy confnb kernel_enclave

# The browser tests drive Debian's Chromium; install it when it is missing (as root, or through sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser tests"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: lint typecheck browser
	$(JLPM) test
	@# Here a missing browser or an unbuilt lab extension fails the browser tests instead of skipping them, and
	@# missing SEV-SNP vectors (../shared/vectors/snp) fail the run instead of skipping the tests that read them.
	CONFNB_REQUIRE_BROWSER=1 CONFNB_REQUIRE_VECTORS=1 $(BIN)/pytest

docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@# Every benchmark runs; the target fails afterwards if any of them missed its target.
	@# Each writes benchmarks/results/<script>.json with its commit and machine; the README table is rewritten from them.
	status=0; for script in attest_verify dataset_ipc_load dataset_parquet_load broker_release kernel_roundtrip vault_ops vault_engine vault_scan difference_checks dp_release soak lab_verify; do \
		$(BIN)/python benchmarks/$$script.py || status=1; done; \
	$(BIN)/python benchmarks/_provenance.py || status=1; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -rf labextension/lib labextension/tsconfig.tsbuildinfo labextension/coverage confnb/server/labextension
