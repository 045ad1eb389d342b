# The two front doors of the README. Both set up everything from the project's own files.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test figures seeds clean

$(VENV)/.installed: requirements.lock pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

## run: set up, then the run of params.yaml (the embedded default) up to its paper, with DVC
run: setup
	dvc repro paper

figures: setup
	snakemake --cores 1 figures

## seeds: the seed study of params.yaml (seeds.ppo): PPO and its evaluation per seed, the across-seed report
seeds: setup
	dvc repro seeds

## test: set up, then run the test suite
test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .snakemake
