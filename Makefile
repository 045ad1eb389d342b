# The two front doors of the README. Both set up everything from the project's own files.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run metrics test lint figures seeds pull clean

$(VENV)/.installed: requirements.lock pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

## run: set up, then the run of params.yaml (the embedded default) up to its paper, with DVC
run: setup
	dvc repro paper

## metrics: the run's metrics (params.yaml) as one table that fits 120 columns; `dvc metrics show` has every file
metrics: setup
	$(PY) scripts/metrics.py

figures: setup
	snakemake --cores 1 figures

## seeds: the seed study of params.yaml (seeds.ppo): PPO and its evaluation per seed, the across-seed report
seeds: setup
	dvc repro seeds

## pull: set up, then get the outputs dvc.lock records from the DVC remote instead of computing them, and check
## that they are those of this checkout (docs/reviewers.md). Computes nothing: it stops at a missing or stale output.
pull: setup
	dvc pull
	@dvc status --quiet || { dvc status; echo "make pull: the outputs above do not match this checkout; dvc repro recomputes them" >&2; exit 1; }
	@echo "make pull: every output is here and up to date; dvc repro has nothing to run"

## lint: ruff's lint and import order (pyproject.toml); `ruff check --fix .` fixes what it can
lint: setup
	$(VENV)/bin/ruff check .

## test: set up, then lint, then run the test suite
test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .snakemake
