# `make demo` and `make test` bootstrap .venv on their own: torch 2.13.0 first (the build pip
# resolves on this machine; TORCH_PIP_ARGS picks another, e.g. PyTorch's CPU index), then prefopt
# with its test extras under constraints.txt. The set-up prints which torch build it installed.
PYTHON ?= python3
TORCH_PIP_ARGS ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prefopt-installed
PYTEST_ARGS ?=

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -c "import torch; c = torch.version.cuda; print('prefopt set-up: torch', torch.__version__, f'(CUDA {c} build)' if c else '(CPU build)', 'in $(VENV); run prefopt as $(BIN)/prefopt, or source $(BIN)/activate first')"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prefopt train

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# prefopt vs TRL and its peers (TRL + Liger-Kernel, TRL + cut-cross-entropy), speed/memory on tiny
# offline Llamas (~20 min on 2 CPU cores before the peers, which add 8 runs); see benchmarks/bench.py.
# The peers' packages are installed here only, under the torch pin: `make venv`/`make test` need none.
# BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--vocab 32000 --no-sweep".
BENCH_PEERS := liger-kernel==0.8.5 cut-cross-entropy==25.1.1 triton==3.9.0
BENCH_ARGS ?=

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt $(BENCH_PEERS)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo_output
