# aurecog: the two commands are `make bench` and `make test`; both build the project's own virtual environment
# (.venv) on first use, exactly as pinned in requirements.lock, and rebuild it when the lock or pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aurecog-installed

DATASET ?= synth
MODELS ?= default
FOLDS ?= all
SEEDS ?= 0
PROFILE ?=
PROTOCOL ?=
TASK ?=
DATA_ROOT ?=
JOBS ?= 2
WANDB ?=
LAUNCHER ?= local
SRC ?=
ARGS ?=

BENCH_ARGS := --dataset $(DATASET) --models $(MODELS) --folds $(FOLDS) --seeds $(SEEDS) --jobs $(JOBS) \
	--launcher $(LAUNCHER) $(if $(PROFILE),--profile $(PROFILE)) $(if $(PROTOCOL),--protocol $(PROTOCOL)) $(if $(TASK),--task $(TASK)) \
	$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(if $(WANDB),--wandb $(WANDB)) $(ARGS)

SYNTH_PRESETS := synth-bp4d synth-disfa synth-gft synth-bp4dplus synth-affwild2 synth-fermix
PRESET_ARGS = --models $(MODELS) --folds $(FOLDS) --seeds $(SEEDS) --jobs $(JOBS) $(if $(WANDB),--wandb $(WANDB)) $(ARGS)

.PHONY: bench study presets test leaderboard perf prepare predict synth pretrain lint env lock clean-cache

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	@touch $(STAMP)

# re-pin after changing pyproject.toml's dependencies: resolve them into .venv, then freeze every package
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q -e ".[dev]"
	{ sed -n '/^#/p' requirements.lock; $(PY) -m pip freeze --exclude-editable | grep -v '^-e '; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	@touch $(STAMP)

env: $(STAMP)

bench: $(STAMP)
	$(PY) -m aurecog.cli bench $(BENCH_ARGS)

# the embedded experiment (configs/study.yaml: main models + ablations, all folds, 3 seeds, synth and synth-fermix
# bias100 / bias90) into results/, reusing finished cells of the same identity, then the leaderboards
study: $(STAMP)
	$(PY) -m aurecog.cli study --jobs $(JOBS) $(if $(WANDB),--wandb $(WANDB)) $(ARGS)

# every other SynthAU preset through the runner: each default protocol, plus DISFA-style intensity, the fermix
# bias90 split and the BP4D -> BP4D+ cross-dataset protocol (e.g. `make presets FOLDS=0`)
presets: $(STAMP)
	rc=0; \
	for d in $(SYNTH_PRESETS); do $(PY) -m aurecog.cli bench --dataset $$d $(PRESET_ARGS) || rc=1; done; \
	$(PY) -m aurecog.cli bench --dataset synth-disfa --task intensity $(PRESET_ARGS) || rc=1; \
	$(PY) -m aurecog.cli bench --dataset synth-fermix --protocol bias90 $(PRESET_ARGS) || rc=1; \
	$(PY) -m aurecog.cli bench --dataset synth-bp4d --protocol to_bp4dplus --models $(MODELS) --seeds $(SEEDS) \
		--jobs $(JOBS) $(if $(WANDB),--wandb $(WANDB)) $(ARGS) || rc=1; \
	exit $$rc

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q $(ARGS)

leaderboard: $(STAMP)
	$(PY) -m aurecog.cli leaderboard $(if $(filter-out synth,$(DATASET)),--dataset $(DATASET),)

perf: $(STAMP)
	$(PY) benchmarks/run_all.py $(ARGS)

prepare: $(STAMP)
	@test -n "$(SRC)" || { echo "usage: make prepare DATASET=<name> SRC=<distribution folder> DATA_ROOT=<prepared root>"; exit 2; }
	@test -n "$(DATA_ROOT)" || { echo "usage: make prepare DATASET=<name> SRC=<distribution folder> DATA_ROOT=<prepared root>"; exit 2; }
	$(PY) -m aurecog.cli prepare $(DATASET) --src $(SRC) --out $(DATA_ROOT)/$(DATASET)

# a trained model on your own images / folders of frames / videos (OpenFace-style CSV; README "Predict")
predict: $(STAMP)
	@test -n "$(SRC)" -a -n "$(MODEL)" || { echo "usage: make predict SRC='<images, folders, videos>' MODEL=<run folder or .ckpt> [CSV=predictions.csv] [ARGS='--overlay DIR']"; exit 2; }
	$(PY) -m aurecog.cli predict $(SRC) --model $(MODEL) --out $(or $(CSV),predictions.csv) $(ARGS)

# pretrain every quick trunk once on the synth-pretrain preset into pretrained/synthau/ (committed; the quick
# profiles start from these files; configs/pretrain/synthau.yaml). E.g. `make pretrain ARGS="--trunks ac2d"`
pretrain: $(STAMP)
	WANDB_MODE=disabled $(PY) -m aurecog.pretrain $(ARGS)

synth: $(STAMP)
	$(PY) -m aurecog.cli synth --preset $(DATASET) --sheet

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-cache:
	rm -rf cache checkpoints logs
