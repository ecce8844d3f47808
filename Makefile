# Every target creates the virtual environment on first use, so a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo cluster-demo test test-unit notebooks bench bench-quick soak lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m persistroids_dist.demo

# Three simulated Ray nodes on this machine, replicas=1, one node lost mid-run.
cluster-demo: $(STAMP)
	$(BIN)/python -m persistroids_dist.cluster_demo

test: $(STAMP)
	$(BIN)/ruff check persistroids_dist connectors tests benchmarks examples notebooks
	$(BIN)/python -m pytest -q

# Ray-free unit tests only: seconds, no servers needed.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Runs notebooks/ top to bottom, each in a fresh kernel of this venv's Python; the executed
# copies go to a new temporary folder (or OUT=dir), never over the committed notebooks.
notebooks: $(STAMP)
	$(BIN)/python tests/run_notebooks.py $(if $(OUT),--out $(OUT))

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

# Not in CI: 10 minutes of mixed load with shard kills and store outages (benchmarks/soak.py).
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak

lint: $(STAMP)
	$(BIN)/ruff check persistroids_dist connectors tests benchmarks examples notebooks

clean:
	rm -rf $(VENV) .pytest_cache
