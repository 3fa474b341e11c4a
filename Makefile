# Two commands for a fresh machine: `make run` and `make test`.
# Both set up .venv (CPU torch first, so nothing pulls a CUDA build), fetch
# Fashion-MNIST, then run the quick preset or the test suite.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.spafl-installed
OUT ?= runs/fmnist-quick

.PHONY: setup data run test results clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,flower]'
	touch $(STAMP)

# On Debian as root, the offline package is the quickest source; elsewhere
# `spafl fetch-data` finds the files or downloads them with SHA-256 checks.
data: $(STAMP)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "$$SPAFL_DATA" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || echo "apt-get could not install dataset-fashion-mnist; trying a download"; \
	fi
	$(BIN)/spafl fetch-data fmnist

run: setup
	$(BIN)/spafl run --preset fmnist-quick --out $(OUT)
	$(BIN)/spafl report $(OUT)

test: setup
	$(BIN)/python -m pytest -q

# Redraw every table and figure of docs/results.md from the runs kept in docs/results/ (no training).
results: $(STAMP)
	for dir in docs/results/*/; do $(BIN)/spafl compare --from $$dir > /dev/null; done
	$(BIN)/spafl report --patterns conv1 docs/results/fmnist-paper/spafl/seed0 > /dev/null

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
