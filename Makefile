# Two commands on a fresh clone: `make train` and `make test`. Both create .venv when it is
# missing (pip; the stamp makes it quick when present) and install flowerdist with its dev extras.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flowerdist-installed
CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=
# pytest-xdist workers (0: one process): each runs torch on one thread; the Slurm tests stay on one worker
TEST_WORKERS ?= 2
XDIST   := -n $(TEST_WORKERS) --dist loadgroup

.PHONY: setup train test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

train: $(STAMP)
	$(PY) -m flowerdist train -c $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -rs $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -rs $(XDIST) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs wandb .pytest_cache

bench: $(STAMP)
	$(PY) -m flowerdist bench $(ARGS)
