"""Sweep configuration (YAML) -> the list of jobs, one per (method, category, seed).

A sweep names methods (by their registry names, or ``all``), a profile (which
config of each method, ``configs/<method>/<profile>.yaml``), categories (``all``:
every category folder present under the root), seeds, precision and devices.
Methods are discovered from the registry and the config folder, so a new method
joins ``all`` without any change here.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import pkgutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adbench import datamodules, models
from adbench.cli import job_config
from adbench.project import config_dir

#: Code every job runs whatever the method (with what these import, found by code_modules):
#: modules, and packages standing for all their modules.
PIPELINE_MODULES = ("adbench.benchmark.orchestration.job", "adbench.cli", "adbench.callbacks", "adbench.datamodules")
PROTOCOLS = ("selected", "paper")
#: ``per-category``: one model per category (the papers' setting); ``unified``: one model trained on
#: the union of the sweep's categories and tested on each (the multi-class setting).
SETTINGS = ("per-category", "unified")
#: ``shots`` entry meaning every training image.
FULL_SHOTS = "full"
LAUNCHER_NAMES = ("local", "slurm")  # adbench.benchmark.orchestration.launchers.LAUNCHERS
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")
#: A variant's keys: ``partner`` (a second row the reports compare it with) and ``note`` (a caveat the
#: ablation table prints) are for the reports only and change no job.
VARIANT_KEYS = {"method", "overrides", "partner", "note"}


#: oneDNN's names for ``ONEDNN_MAX_CPU_ISA`` (x86-64), lowest first.
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX512_CORE_FP16", "AVX10_1_512_AMX",
               "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT")


class SweepConfigError(ValueError):
    """A sweep setting that cannot be run; the message names the setting and value."""


@dataclass
class SweepConfig:
    """What a sweep runs. Every field can be set in the YAML and overridden on the command line."""

    name: str = "default"
    methods: list[str] | str = "all"
    profile: str = "quick"
    categories: list[str] | str = "all"
    seeds: list[int] = field(default_factory=lambda: [0])
    #: Seed of the validation split, the few-shot draw and the validation anomalies (and of which
    #: texture classes validation holds out). None: each job's ``seed``, so seeds vary the split too;
    #: an integer fixes it for every job. The job spec records the value and which (``split_seed_source``).
    split_seed: int | None = None
    #: A registered dataset (adbench.datamodules.list_datasets()); its layout is read under ``root``.
    dataset: str = "mvtec"
    root: str | None = None  # None: the embedded procedural dataset (mvtec only)
    #: Few-shot: normal training images per category, e.g. [1, 2, 4, 8, full]; ``full``: all of them.
    shots: list[int | str] = field(default_factory=lambda: [FULL_SHOTS])
    setting: str = "per-category"
    texture_root: str | None = None  # None: procedural textures
    precision: str = "32-true"
    #: CPU jobs: the highest instruction set oneDNN (torch's CPU convolutions) may use, e.g. ``AVX2``.
    #: Its kernels round differently on AVX-512 and AVX2 CPUs, and a short training amplifies that
    #: (results/reproducibility.md); pinned, the same command gives the same numbers on any x86-64
    #: CPU with AVX2, at some speed. None: the best the CPU has.
    cpu_isa: str | None = None
    #: ``selected``: hold out part of train/good, test the checkpoint chosen on it (our default);
    #: ``paper``: train on all of train/good and test the last epoch, as the papers do.
    protocol: str = "selected"
    accelerator: str = "auto"
    devices_per_job: int = 1  # >1: one DDP job across that many devices
    parallel: int | None = None  # concurrent jobs; None: one per GPU group, else 1
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted CLI keys for every job
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Named variants (e.g. ablations): name -> {method: <registry name>, overrides: {...}}.
    #: A variant name can be listed in ``methods`` like a method and gets its own leaderboard row.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Seed-versus-baseline pairs of the reports: row -> the row it is compared with on the same
    #: footing (same encoder, same budget), e.g. ``{pouta: draem-pretrained-encoder}``. Names are
    #: methods or variants; every job of a row records its baseline (the ablation table reads it).
    baselines: dict[str, str] = field(default_factory=dict)
    retry_failed: bool = True
    #: local launcher: stop (and record as failed) a job running longer than this; None: no limit.
    #: On SLURM the array's time limit is ``slurm.time_min``.
    job_timeout_min: float | None = None
    wandb: dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    #: ``local``: this machine's process pool; ``slurm``: a job array through submitit.
    launcher: str = "local"
    #: sbatch resources of the ``slurm`` launcher (adbench.benchmark.orchestration.launchers.SlurmSettings).
    slurm: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> SweepConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sweep config {str(path)!r} not found")
        data = yaml.safe_load(path.read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SweepConfigError(f"unknown key(s) {sorted(unknown)} in sweep config {str(path)!r}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        if self.launcher not in LAUNCHER_NAMES:
            raise SweepConfigError(f"launcher {self.launcher!r} is not one of {LAUNCHER_NAMES}")
        if self.protocol not in PROTOCOLS:
            raise SweepConfigError(f"protocol {self.protocol!r} is not one of {PROTOCOLS}")
        if self.setting not in SETTINGS:
            raise SweepConfigError(f"setting {self.setting!r} is not one of {SETTINGS}")
        if self.dataset not in datamodules.list_datasets():
            raise SweepConfigError(f"dataset {self.dataset!r} is not registered; registered: "
                                   f"{', '.join(datamodules.list_datasets())}")
        if self.root is None and self.dataset != "mvtec":
            raise SweepConfigError(f"dataset {self.dataset!r} needs a root (the embedded data is in MVTec layout)")
        self.shots = _as_list(self.shots) if isinstance(self.shots, str) else list(self.shots)
        bad = [s for s in self.shots if s != FULL_SHOTS and not (isinstance(s, int) and s > 0)]
        if not self.shots or bad:
            raise SweepConfigError(f"shots must list positive integers or {FULL_SHOTS!r}, got {self.shots!r}")
        if self.cpu_isa is not None and self.cpu_isa.upper() not in ONEDNN_ISAS:
            raise SweepConfigError(f"cpu_isa {self.cpu_isa!r} is not one of {ONEDNN_ISAS} (or null)")
        if self.precision not in PRECISIONS:
            raise SweepConfigError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.devices_per_job < 1:
            raise SweepConfigError(f"devices_per_job must be >= 1, got {self.devices_per_job}")
        if self.job_timeout_min is not None and not self.job_timeout_min > 0:
            raise SweepConfigError(f"job_timeout_min must be > 0 minutes (or null), got {self.job_timeout_min}")
        if self.parallel is not None and self.parallel < 1:
            raise SweepConfigError(f"parallel must be >= 1, got {self.parallel}")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise SweepConfigError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        for name, variant in self.variants.items():
            if not isinstance(variant, dict) or "method" not in variant or set(variant) - VARIANT_KEYS:
                raise SweepConfigError(
                    f"variant {name!r} must be {{method: <registered name>, overrides: {{...}}}}, got {variant!r}"
                )
        if self.split_seed is not None and not isinstance(self.split_seed, int):
            raise SweepConfigError(f"split_seed must be an integer or null (follow each job's seed), got {self.split_seed!r}")
        if not isinstance(self.baselines, dict):
            raise SweepConfigError(f"baselines must map a row to its baseline row, got {self.baselines!r}")
        for row, baseline in self.baselines.items():
            for name in (row, baseline):
                if name not in self.variants and name not in models.list_models():
                    raise SweepConfigError(f"baselines: {name!r} ({row}: {baseline}) is neither a registered "
                                           f"method nor a variant of this sweep")

    # ------------------------------------------------------------------ expansion

    def resolve_methods(self) -> list[str]:
        available = [m for m in models.list_models() if config_path(m, self.profile).is_file()]
        if self.methods == "all":
            if not available:
                raise SweepConfigError(f"no registered method has a {self.profile!r} profile")
            return available
        requested = _as_list(self.methods)
        for name in requested:
            method = self.variants.get(name, {}).get("method", name)
            if method not in models.list_models():
                raise SweepConfigError(
                    f"unknown method {name!r}; registered: {', '.join(models.list_models())}"
                    + (f"; variants: {', '.join(self.variants)}" if self.variants else "")
                )
            if not config_path(method, self.profile).is_file():
                raise SweepConfigError(
                    f"method {method!r} has no {self.profile!r} profile ({config_path(method, self.profile)})"
                )
        return requested

    def _datamodule(self) -> datamodules.AnomalyDataModule:
        """The sweep's dataset, built with its data arguments, to list what is present."""
        arguments = {k.removeprefix("data.").removeprefix("init_args."): v
                     for k, v in self.overrides.items() if k.startswith("data.")}
        # A named category, when there is one: a dataset whose category is only a name (folder) has no "all".
        first = None if self.categories == "all" else (_as_list(self.categories) or [None])[0]
        arguments.update(root=self.root, category=first or datamodules.ALL_CATEGORIES)
        try:
            return datamodules.get_dataset_class(self.dataset)(**arguments)
        except (TypeError, ValueError) as error:
            raise SweepConfigError(f"dataset {self.dataset!r}: {error}") from error

    def resolve_categories(self) -> list[str]:
        """The sweep's categories, as its datamodule finds them under the root."""
        data = self._datamodule()
        try:
            root = data.existing_root(data.dataset_root)
            present = data.find_categories()
        except (OSError, datamodules.DatasetError) as error:
            raise SweepConfigError(str(error)) from error
        if self.categories == "all":
            if not present:
                raise SweepConfigError(f"no {self.dataset} category folders under {str(root)!r}")
            return present
        requested = _as_list(self.categories)
        missing = [c for c in requested if c not in present]
        if missing:
            raise SweepConfigError(
                f"category {missing[0]!r} not found under {str(root)!r}; present: {', '.join(present) or 'none'}"
            )
        return requested

    def jobs(self) -> list[JobSpec]:
        categories = self.resolve_categories()
        # Unified: one job per method and seed, trained on all the categories, tested on each.
        groups = [categories] if self.setting == "unified" else [[category] for category in categories]
        return [
            JobSpec(
                sweep=self.name,
                name=name,
                method=self.variants.get(name, {}).get("method", name),
                profile=self.profile,
                categories=group,
                seed=seed,
                split_seed=seed if self.split_seed is None else self.split_seed,
                split_seed_source="seed" if self.split_seed is None else "sweep",
                baseline=self.baselines.get(name),
                root=self.root,
                texture_root=self.texture_root,
                precision=self.precision,
                cpu_isa=self.cpu_isa and self.cpu_isa.upper(),
                protocol=self.protocol,
                accelerator=self.accelerator,
                devices=self.devices_per_job,
                overrides={
                    **self.overrides,
                    **self.method_overrides.get(name, {}),
                    **self.variants.get(name, {}).get("overrides", {}),
                },
                wandb=self.wandb,
                dataset=self.dataset,
                shots=None if shots == FULL_SHOTS else int(shots),
                setting=self.setting,
            )
            for name in self.resolve_methods()
            for group in groups
            for shots in self.shots
            for seed in self.seeds
        ]


@dataclass
class JobSpec:
    """Everything one job needs; its hash decides whether an old record is still valid."""

    sweep: str
    name: str  # leaderboard row: the method's registry name, or a variant's name
    method: str
    profile: str
    categories: list[str]  # one, or all of the sweep's in the unified setting
    seed: int
    root: str | None
    texture_root: str | None
    precision: str
    accelerator: str
    devices: int
    overrides: dict[str, Any]
    wandb: dict[str, Any]
    protocol: str = "selected"
    dataset: str = "mvtec"
    shots: int | None = None  # few-shot: normal training images per category; None: all
    setting: str = "per-category"  # or "unified": one model for all of ``categories``
    cpu_isa: str | None = None  # ONEDNN_MAX_CPU_ISA of a CPU job; None: the CPU's best
    #: The datamodule's split_seed (validation split, few-shot draw, validation anomalies); None: its default.
    split_seed: int | None = None
    #: Where split_seed comes from: ``seed`` (follows the job's seed) or ``sweep`` (fixed by the sweep's split_seed).
    split_seed_source: str | None = None
    #: The row this job's row is compared with on the same footing (the sweep's ``baselines``); None: none.
    baseline: str | None = None
    #: Where the job runs, as the runner's slot sets it: {"device": ..., "threads": ...}.
    execution: dict[str, Any] = field(default_factory=dict)

    @property
    def category(self) -> str:
        """The job's category, or ``unified`` for a model of several."""
        return "unified" if self.setting == "unified" else self.categories[0]

    @property
    def job_id(self) -> str:
        data = self.category
        if self.dataset != "mvtec":
            data = f"{self.dataset}-{data}"
        shots = "" if self.shots is None else f"__shots{self.shots}"
        return f"{self.name}__{self.profile}__{data}__seed{self.seed}{shots}"

    @property
    def config_file(self) -> Path:
        return config_path(self.method, self.profile)

    def fingerprint(self) -> str:
        """Hash of what determines the result: the spec (not the sweep name or W&B settings), the
        method's YAML, the source of the code it runs (:func:`code_hash`) and where it runs
        (device kind, CPU threads). A record whose fingerprint differs is rerun, never reused."""
        # Neither where split_seed came from nor the report's pairing changes the result.
        content = {k: v for k, v in asdict(self).items()
                   if k not in ("sweep", "wandb", "split_seed_source", "baseline")}
        # Fields added later count only when set, so older records of the default stay comparable.
        for key, default in (("dataset", "mvtec"), ("shots", None), ("setting", "per-category"), ("cpu_isa", None),
                             ("split_seed", None)):
            if content.get(key) == default:
                content.pop(key)
        content["config_text"] = self.config_file.read_text() if self.config_file.is_file() else None
        content["code"] = code_hash(self.method)
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def settings(self) -> dict[str, Any]:
        """What this job sets beyond its method's YAML, by the names of ``adbench.cli.JOB_SETTINGS``."""
        return {
            "seed": self.seed,
            "split_seed": self.split_seed,
            "categories": list(self.categories),
            "root": self.root,
            "texture_root": self.texture_root,
            "shots": self.shots,
            # paper protocol: all of train/good for training; no validation, the last epoch is tested
            "val_fraction": 0 if self.protocol == "paper" else None,
            "precision": self.precision,
            "accelerator": self.accelerator,
            "devices": self.devices,
            "strategy": models.get_model_class(self.method).ddp_strategy if self.devices > 1 else None,
        }

    def config(self) -> dict[str, Any]:
        """The job's whole config, as the Lightning CLI takes it (``adbench.cli.job_config``)."""
        return job_config(self.config_file, self.dataset, self.settings(), self.overrides)


def code_modules(method: str) -> list[str]:
    """The suite's modules a job of ``method`` runs: the method's module and every ``adbench``
    module it imports (transitively), plus :data:`PIPELINE_MODULES` and their imports.

    Package ``__init__`` modules are not followed: ``adbench.models`` imports every method
    to register it, and editing one method must not make the others' records stale.
    """
    start = [models.get_model_class(method).__module__]
    for name in PIPELINE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:  # a package: all its modules
            start += [f"{name}.{info.name}" for info in pkgutil.iter_modules(spec.submodule_search_locations)]
        else:
            start.append(name)
    seen: set[str] = set()
    todo = [name for name in start if _module_file(name) is not None]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        todo += [m for m in _imported_modules(name, path, path.stat().st_mtime_ns) if m not in seen]
    return sorted(seen)


@functools.cache
def _file_digest(path: Path, mtime_ns: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_hash(method: str) -> str:
    """Hash of :func:`code_modules` (names and file contents): changes exactly when that code
    changes, and is the same for a clone and an installed copy."""
    digest = hashlib.sha256()
    for name in code_modules(method):
        path = _module_file(name)
        digest.update(name.encode())
        digest.update(_file_digest(path, path.stat().st_mtime_ns).encode())
    return digest.hexdigest()[:16]


@functools.cache
def _module_file(name: str) -> Path | None:
    """The source file of an ``adbench`` module (None for a package ``__init__``, a class or a
    module outside the suite)."""
    if not name.startswith("adbench."):
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, AttributeError, ValueError):  # ``from module import Class``: not a module
        return None
    if spec is None or spec.origin is None or spec.submodule_search_locations is not None:
        return None
    return Path(spec.origin)


@functools.cache
def _imported_modules(name: str, path: Path, mtime_ns: int) -> list[str]:
    """The suite's modules (not package ``__init__``s) that module ``name`` imports (cached per version)."""
    package = name.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module or ""
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return [m for m in names if m and _module_file(m) is not None]


def config_path(method: str, profile: str) -> Path:
    return config_dir() / method / f"{profile}.yaml"


def _as_list(value: list[Any] | str) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)
