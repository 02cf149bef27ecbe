# kdprompt: `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch is pinned to the release this kind of machine ships on disk (see ../shared/REFERENCE.md).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.kdprompt-installed

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/kdprompt demo

test: install
	$(PY) -m pytest -m "not gpu" tests

test-fast: install
	$(PY) -m pytest -m "not slow and not dist and not gpu" tests

lint: install
	$(VENV)/bin/ruff check kdprompt tests
	$(VENV)/bin/ruff format --check kdprompt tests

clean:
	rm -rf runs .pytest_cache
