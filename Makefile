# Quick start: `make demo` (main job on the built-in data), `make test` (all tests).
# Both create or reuse the virtual environment in .venv and install the package with its dev extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast sync-check nbtest pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ranger-fastai demo

test: $(STAMP) sync-check nbtest pytest

# For development: the library's and the notebooks' sync, and the tests not marked slow (no end-to-end runs of the command)
test-fast: $(STAMP) sync-check
	$(BIN)/python -m pytest -m 'not slow' -q

# Fails when nbdev-clean + nbdev-export change any file: notebooks and library out of sync.
sync-check: $(STAMP)
	@before="$$(git status --porcelain; git diff)"; \
	$(BIN)/nbdev-clean && $(BIN)/nbdev-export; \
	after="$$(git status --porcelain; git diff)"; \
	if [ "$$before" != "$$after" ]; then echo "Notebooks and library are not in sync: run nbdev-clean and nbdev-export, then commit"; git status --short; exit 1; fi

nbtest: $(STAMP)
	$(BIN)/nbdev-test --n-workers 2

pytest: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/optimizer_step.py

clean:
	rm -rf $(VENV) build *.egg-info
