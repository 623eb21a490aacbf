# The two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV    ?= .venv
PY      := $(VENV)/bin/python
GEN     := $(VENV)/bin/gen
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup test demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in the train extra: that build installs from local disk, CPU only
	$(PY) -m pip install -q -e ".[train,serve,dev]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) -m gen.demo

clean:
	rm -rf $(VENV) runs .pytest_cache
