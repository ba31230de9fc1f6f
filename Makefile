# `make demo` and `make test` bootstrap .venv on their own: torch (pinned CPU build) first,
# then prefopt with its test extras under constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prefopt-installed
PYTEST_ARGS ?=

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prefopt train

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# prefopt vs TRL speed/memory on tiny offline Llamas (~20 min on 2 CPU cores); see benchmarks/bench.py
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) demo_output
