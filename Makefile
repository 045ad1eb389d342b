# The two front doors of the README. Both set up everything from the project's own files.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test figures seeds clean

$(VENV)/.installed: requirements.lock pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

## run: set up, then regenerate every result of params.yaml (the embedded default) with DVC
run: setup
	dvc repro

figures: setup
	snakemake --cores 1 figures

## seeds: PPO and the evaluation again with other seeds on the finished run (studies/ppo_seeds.py)
seeds: setup
	$(PY) studies/ppo_seeds.py

## test: set up, then run the test suite
test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .snakemake
