# selector: `make demo` runs the main job end to end, `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SEL    := $(VENV)/bin/selector
DEMO   := demo
# torch first, pinned to the local CPU wheel; without it pip would pull the multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# every package's version, as the tests and benchmarks ran (`make lock` writes it)
CONSTRAINTS ?= constraints.txt
PIN    := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install lock demo test test-slow test-all lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIN) $(TORCH)
	$(PY) -m pip install -q $(PIN) -e '.[dev,postgres]'
	touch $@

lock: install
	grep '^#' constraints.txt > constraints.txt.new
	# torch without its local label (+cpu): the same pin takes the CUDA build of that version
	$(PY) -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' >> constraints.txt.new
	mv constraints.txt.new constraints.txt

demo: install
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(SEL) run studies/digits.toml --storage sqlite:///$(DEMO)/selector.db
	$(SEL) status digits-mlp --storage sqlite:///$(DEMO)/selector.db
	$(SEL) export digits-mlp --storage sqlite:///$(DEMO)/selector.db -o $(DEMO)/best.json
	$(SEL) final digits-mlp --storage sqlite:///$(DEMO)/selector.db

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow --durations=10

test-all: install
	$(PY) -m pytest -q -m ''

lint: install
	$(VENV)/bin/ruff check selector tests bench
	$(VENV)/bin/ruff format --check selector tests bench
	$(VENV)/bin/mypy selector

bench: install
	$(PY) -m bench
	$(PY) -m bench.bookkeeping --trials 30
	$(PY) -m bench.bookkeeping --trials 12 --pruner median
	$(PY) -m bench.anytime

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .ruff_cache *.egg-info
