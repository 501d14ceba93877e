# `make repro`: set up .venv if needed, then run the default pipeline (dvc repro).
# `make lock`: record the installed versions in constraints.txt (setup installs exactly those).
# `make test`:  set up .venv if needed, then lint and run the whole test suite (CI runs it).
# `make test-fast`: lint and the fast tier (`pytest -m "not slow"`), for the edit-test loop.
# Both run pytest on PYTEST_WORKERS processes (pytest-xdist; `make test PYTEST_WORKERS=0`: one).
# `make services` / `make services-down`: the team stack on loopback (vlp/services.py; .env).
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc runs stage commands (`vlp ...`) through a shell: the venv must be on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup

.PHONY: setup lock repro test test-fast lint format services services-down

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev,services]' -c constraints.txt
	touch $(STAMP)

# constraints.txt: the versions of everything `setup` installs, from the current .venv
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -v -i -E '^(torch|nvidia-|triton)=='; } > constraints.tmp && mv constraints.tmp constraints.txt

repro: $(STAMP)
	$(BIN)/dvc repro

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(PYTEST)

test-fast: lint
	$(PYTEST) -m "not slow"

# installs PostgreSQL (apt) if missing, starts what is not running, prints the URLs
services: $(STAMP)
	$(BIN)/python -m vlp.services up

services-down:
	$(BIN)/python -m vlp.services down
