# `make demo` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean install

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PIP) install --quiet -c constraints.txt torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(PIP) install --quiet -c constraints.txt -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, ckptkit, timellm, gcsfs, gcp_storage_emulator"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
