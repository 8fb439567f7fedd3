# Quick start: `make demo` (main job on the built-in data), `make test` (all tests).
# Both create or reuse the virtual environment in .venv and install the package with its dev extra.
# README.md is generated from nbs/index.ipynb: `make readme` after editing it (`make test` checks it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast sync-check readme nbtest pytest bench clean

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

# Fails when nbdev-clean + nbdev-export change any file (notebooks and library out of sync),
# or when README.md is not what tools/readme.py renders from nbs/index.ipynb.
sync-check: $(STAMP)
	@before="$$(git status --porcelain; git diff)"; \
	$(BIN)/nbdev-clean && $(BIN)/nbdev-export; \
	after="$$(git status --porcelain; git diff)"; \
	if [ "$$before" != "$$after" ]; then echo "Notebooks and library are not in sync: run nbdev-clean and nbdev-export, then commit"; git status --short; exit 1; fi
	$(BIN)/python tools/readme.py --check

# README.md is generated from nbs/index.ipynb (standard library only: no environment needed)
readme:
	$(PYTHON) tools/readme.py

nbtest: $(STAMP)
	$(BIN)/nbdev-test --n-workers 2

pytest: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/optimizer_step.py

clean:
	rm -rf $(VENV) build *.egg-info
