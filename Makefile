# kvpick — the two commands: `make up` and `make test`.
# Both build their own virtualenv in .venv; nothing installed by hand is used.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvpick-installed

.PHONY: up test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "kvpick needs Python >= 3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/kvpick bench index

# The local stack (Envoy + EPP + sidecars + simulated engines) arrives with a
# later issue; until then `make up` installs kvpick and shows what exists.
up: $(STAMP)
	@$(BIN)/kvpick --help
	@echo
	@echo "kvpick: the local stack (kvpick up) is not built yet; see README.md, 'Status'."

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
