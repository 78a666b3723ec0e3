# kvpick — the two commands: `make up` and `make test`.
# Both build their own virtualenv in .venv; nothing installed by hand is used.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvpick-installed

.PHONY: up test test-pure test-reliability soak lint bench venv clean

venv: $(STAMP)

# The stamp also follows the C sources, so that editing them rebuilds epp._kvnative.
# NIXL (KV blocks between simulated engines, host memory over UCX) goes in with --no-deps:
# nixl-cu12 declares torch and CUDA (~5 GB) that host-memory transfers never load; its real
# needs (numpy) come with kvpick. The last line fails the build if NIXL cannot be imported.
$(STAMP): pyproject.toml setup.py $(wildcard epp/native/*.c epp/native/*.h)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "kvpick needs Python >= 3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'nixl==1.5.1' 'nixl-cu12==1.5.1'
	@$(BIN)/python -c 'import sys; from workers.sim.kv_transfer import nixl_available; sys.exit(nixl_available())'
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

# The unit tests again on the pure-Python fallback of the compiled helpers (what runs
# where epp._kvnative could not be built).
test-pure: $(STAMP)
	KVPICK_PURE_PYTHON=1 $(BIN)/pytest -q tests/unit

# Whole processes (Envoy, the EPP, simulated engines) under hostile input, kills and load:
# docs/operations.md says what each test checks. About a minute; CI runs it.
test-reliability: $(STAMP)
	$(BIN)/pytest -m reliability tests/reliability

# The soak: 200 requests/s through Envoy and the EPP, per-minute figures (10 minutes).
soak: $(STAMP)
	$(BIN)/kvpick bench soak

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
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info epp/*.so
