"""The Lightning half of ``adbench`` (the entry point, ``adbench/__main__.py``, dispatches here;
sweep jobs run through :class:`AnomalyCLI` too).

    adbench fit      --config configs/stpm/quick.yaml --data.category bottle --data.root $MVTEC_ROOT
    adbench test     --config configs/stpm/quick.yaml --data.category bottle --ckpt_path best
    adbench validate (same arguments)
    adbench predict  --ckpt_path runs/stpm/bottle/seed0/checkpoints/best.ckpt --data.path FOLDER_OR_IMAGE
    adbench export   --ckpt_path CKPT --format onnx|torchscript   (preprocessing inside; see adbench/export.py)
    adbench models   (list the registered methods)

Every run uses the protocol of a sweep job (one definition, :class:`AnomalyCLI`): the
evaluator, the NaN guard, the loss history, timing, the anomaly-map pictures and the
checkpoint selected on validation (``best.ckpt``) beside the final weights
(``last.ckpt``, always written). Everything a run writes goes into one run folder,
``runs/<method>/<category>/seed<seed>/`` unless ``--trainer.default_root_dir`` says
otherwise, printed at the end; ``--ckpt_path best|last`` finds that folder's checkpoints
in a new process. A method can be named by registry name (``--model stpm``), class
name (``--model STPM``) or class path (``adbench.models.stpm.STPM``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from adbench import datamodules, models
from adbench.callbacks.allocator import ReuseFreedMemory
from adbench.callbacks.evaluation import SELECTION_MONITOR, AnomalyEvaluator
from adbench.callbacks.guards import LossHistory, NonFiniteLossGuard
from adbench.callbacks.pixel_histograms import PixelHistograms
from adbench.callbacks.timing import TimingCallback
from adbench.callbacks.visualization import AnomalyMapVisualizer
from adbench.checkpoints import check_not_legacy
from adbench.datamodules import AnomalyDataModule, MVTecDataModule
from adbench.models.base import AnomalyModule

RUNS_FOLDER = "runs"
#: `adbench test` writes its per-image scores here, inside the run folder.
TEST_SCORES_FILE = "test_scores.csv"
# A sweep job (or a test) builds the CLI from a list while its own process has other arguments:
# that is intended here, so LightningCLI's warning about it is noise.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


class SelectionCheckpoint(ModelCheckpoint):
    """``best.ckpt``: the validated epoch with the best ``val/selection_score`` (never the test set);
    ``last.ckpt``: the final weights, written at the end of every fit whatever the validation
    schedule, so a run always leaves a checkpoint. Files go to ``<default_root_dir>/checkpoints``.

    A new fit into a folder that holds an earlier fit's checkpoints moves them into
    ``checkpoints/previous/`` first (replacing what an older refit left there), so ``best`` and
    ``last`` always name the same, latest fit; a fit that resumes (``--ckpt_path``) keeps them."""

    def __init__(self, dirpath: str | Path | None = None) -> None:
        # No version counter: best.ckpt is this fit's best, never a best-v1.ckpt beside an older best.
        super().__init__(dirpath=dirpath, monitor=SELECTION_MONITOR, mode="max", save_top_k=1,
                         save_last=False, filename="best", enable_version_counter=False)
        self._warned_no_score = False
        self._resumed = False

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        if stage == "fit":
            self._resumed = False  # until Lightning restores this callback's state, after setup
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = True  # called only when a fit resumes from a checkpoint (before on_train_start)
        super().load_state_dict(state_dict)

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        # Here, not in setup: Lightning restores a resumed fit's checkpoint after setup, and that file
        # (e.g. a SLURM requeue checkpoint) may lie in this folder.
        if not self._resumed and trainer.is_global_zero:
            set_aside_earlier_fit(Path(self.dirpath))
        super().on_train_start(trainer, pl_module)

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> None:
        # Lightning raises when the monitored key is missing. A validation split with one label only
        # (e.g. 2 held-out images, neither given a synthetic anomaly) has no selection score: then
        # there is no best epoch to keep, and last.ckpt (always written) is the run's checkpoint.
        if self.monitor not in monitor_candidates:
            if not self._warned_no_score:
                rank_zero_warn(f"validation gave no {self.monitor} (its split needs normal and anomalous "
                               "images: raise data.val_fraction?); best.ckpt is not written, last.ckpt is")
                self._warned_no_score = True
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    @property
    def last_model_path_on_disk(self) -> Path:
        return Path(self.dirpath or ".") / "last.ckpt"

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        trainer.save_checkpoint(self.last_model_path_on_disk)


PREVIOUS_FIT_FOLDER = "previous"


def set_aside_earlier_fit(checkpoints: Path) -> Path | None:
    """Move an earlier fit's checkpoints (``*.ckpt`` in ``checkpoints``) into ``checkpoints/previous/``,
    replacing that folder's content; returns it, or None when there was nothing to move."""
    earlier = sorted(checkpoints.glob("*.ckpt"))
    if not earlier:
        return None
    previous = checkpoints / PREVIOUS_FIT_FOLDER
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir(parents=True)
    for path in earlier:
        path.rename(previous / path.name)
    print(f"[adbench] {checkpoints} held an earlier fit's checkpoints ({', '.join(p.name for p in earlier)}): "
          f"moved to {previous}; best/last now name this fit", file=sys.stderr)
    return previous


def protocol_callbacks() -> list[Callback]:
    """What every run gets, CLI or sweep job: one definition of the protocol."""
    return [AnomalyEvaluator(), NonFiniteLossGuard(), LossHistory(), TimingCallback(), AnomalyMapVisualizer(),
            PixelHistograms(), ReuseFreedMemory(), SelectionCheckpoint()]


def _registered_class(name: str) -> type[AnomalyModule] | None:
    """The registered method called ``name``: registry name, class name or class path."""
    for registered in models.list_models():
        cls = models.get_model_class(registered)
        if name in (registered, cls.__name__, f"{cls.__module__}.{cls.__name__}"):
            return cls
    return None


def _dataset_class(class_path: str) -> type | None:
    return next((datamodules.get_dataset_class(n) for n in datamodules.list_datasets()
                 if datamodules.dataset_class_path(n) == class_path), None)


def _class_path(name: str) -> str:
    """A registry name (``stpm``) or class name (``STPM``) -> the class path LightningCLI wants."""
    cls = _registered_class(name)
    return name if cls is None else f"{cls.__module__}.{cls.__name__}"


def _data_class_path(name: str) -> str:
    """A registered dataset name (``visa``) -> its datamodule's class path; anything else unchanged."""
    return datamodules.dataset_class_path(name) if name in datamodules.list_datasets() else name


def expand_model_names(argv: Sequence[str]) -> list[str]:
    """``--model stpm`` / ``--model=stpm`` and ``--data visa`` / ``--data=visa`` -> the class
    paths LightningCLI wants; anything else unchanged."""
    expanders = {"--model": _class_path, "--data": _data_class_path}
    out, expand_next = [], None
    for arg in argv:
        if expand_next is not None:
            arg, expand_next = expand_next(arg), None
        elif arg in expanders:
            expand_next = expanders[arg]
        elif arg.split("=", 1)[0] in expanders and "=" in arg:
            flag, value = arg.split("=", 1)
            arg = f"{flag}={expanders[flag](value)}"
        out.append(arg)
    return out


#: A sweep job's settings (benchmark/orchestration/sweep.py, ``JobSpec.settings``) -> the config keys
#: that realise them: the one place where the sweep's names meet the CLI's.
JOB_SETTINGS = {
    "seed": "seed_everything",
    "split_seed": "data.init_args.split_seed",
    "categories": "data.init_args.category",
    "root": "data.init_args.root",
    "texture_root": "data.init_args.texture_source",
    "shots": "data.init_args.train_shots",
    "val_fraction": "data.init_args.val_fraction",
    "precision": "trainer.precision",
    "accelerator": "trainer.accelerator",
    "devices": "trainer.devices",
    "strategy": "trainer.strategy",
}
#: Config groups whose value is a class (``class_path`` + ``init_args``).
_CLASS_GROUPS = ("model", "data")


def job_config(config_file: str | Path, dataset: str, settings: dict[str, Any],
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sweep job's whole config, as :class:`AnomalyCLI` takes it (``args=``) and as
    ``adbench fit --config`` reads it back: the method's YAML, then the dataset, the job's
    ``settings`` (keys of :data:`JOB_SETTINGS`; ``None`` values are left out) and ``overrides``
    (dotted config keys, e.g. ``model.init_args.lr`` or ``trainer.max_epochs``), in that order."""
    config = yaml.safe_load(Path(config_file).read_text()) or {}
    for group in _CLASS_GROUPS:  # ``data: {image_size: 256}`` -> ``data: {init_args: {image_size: 256}}``
        value = config.get(group) or {}
        if isinstance(value, dict):
            init_args = {k: v for k, v in value.items() if k not in ("class_path", "init_args")}
            config[group] = {**({"class_path": value["class_path"]} if "class_path" in value else {}),
                             "init_args": {**init_args, **(value.get("init_args") or {})}}
    config["data"] = {"class_path": datamodules.dataset_class_path(dataset), "init_args": config["data"]["init_args"]}
    unknown = set(settings) - set(JOB_SETTINGS)
    if unknown:
        raise KeyError(f"job setting(s) {sorted(unknown)} have no config key (adbench.cli.JOB_SETTINGS)")
    for key, value in settings.items():
        if value is not None:
            _set_dotted(config, JOB_SETTINGS[key], value)
    for key, value in (overrides or {}).items():
        _set_dotted(config, key, value)
    if isinstance(config.get("model"), dict) and "class_path" in config["model"]:
        config["model"]["class_path"] = _class_path(str(config["model"]["class_path"]))
    return config


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config[a][b][c] = value`` for ``key`` ``a.b.c``; a class group's options go under its
    ``init_args`` whether or not the key says so (``model.lr`` = ``model.init_args.lr``)."""
    parts = key.split(".")
    if parts[0] in _CLASS_GROUPS and len(parts) > 1 and parts[1] not in ("class_path", "init_args"):
        parts.insert(1, "init_args")
    node = config
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


class AnomalyCLI(LightningCLI):
    """LightningCLI with the suite's protocol: any AnomalyModule, the MVTec DataModule, the run folder."""

    def __init__(
        self,
        args: Sequence[str] | dict[str, Any] | None = None,
        run: bool = True,
        extra_callbacks: Sequence[Callback] = (),
        trainer_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            AnomalyModule,
            AnomalyDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            trainer_defaults={
                "enable_model_summary": False,  # "Total Flops 0" and a table nobody reads per run
                **(trainer_defaults or {}),
                "callbacks": [*protocol_callbacks(), *extra_callbacks],
            },
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "adbench"},
            args=args if args is None or isinstance(args, dict) else expand_model_names(args),
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        # A config or command line that names no dataset gets MVTec AD (``--data visa`` picks another).
        parser.set_defaults({"data": {"class_path": f"{MVTecDataModule.__module__}.{MVTecDataModule.__name__}"}})

    def _parse_ckpt_path(self) -> None:
        # Lightning rebuilds the model from the checkpoint's class path: refuse a pre-namespace one clearly.
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_not_legacy(torch.load(ckpt_path, map_location="cpu", weights_only=False), ckpt_path)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("default_root_dir") is None:
            config.trainer.default_root_dir = str(self.run_folder(config))
        if self.subcommand in ("test", "validate", "predict") and config.get("ckpt_path") in ("best", "last"):
            path = Path(config.trainer.default_root_dir) / "checkpoints" / f"{config.ckpt_path}.ckpt"
            if not path.is_file():
                hint = ("validation never ran (check_val_every_n_epoch > max_epochs?): use --ckpt_path last"
                        if config.ckpt_path == "best" and path.with_name("last.ckpt").is_file()
                        else "run `adbench fit` with the same --config/--data.category/--seed_everything first")
                raise SystemExit(f"error: --ckpt_path {config.ckpt_path}: no checkpoint at {str(path)!r}; {hint}")
            config.ckpt_path = str(path)

    @staticmethod
    def run_folder(config: Any) -> Path:
        class_path = str(config.model.class_path) if "class_path" in config.model else "model"
        name = getattr(_registered_class(class_path), "registry_name", class_path.rsplit(".", 1)[-1].lower())
        data = config.data.init_args
        dataset = str(config.data.class_path).rsplit(".", 1)[-1]
        folder = Path(RUNS_FOLDER) / name
        if dataset != MVTecDataModule.__name__:  # runs on other datasets get their own level
            folder /= getattr(_dataset_class(str(config.data.class_path)), "dataset_name", None) or dataset.lower()
        categories = data.category if isinstance(data.category, list) else str(data.category).split(",")
        category = "+".join(c.strip() for c in categories)
        shots = f"-shots{data.train_shots}" if data.get("train_shots") else ""
        return folder / category / f"seed{config.seed_everything}{shots}"

    def _callback(self, kind: type) -> Any:
        return next(c for c in self.trainer.callbacks if isinstance(c, kind))

    @property
    def evaluator(self) -> AnomalyEvaluator:
        return self._callback(AnomalyEvaluator)

    @property
    def checkpoint(self) -> SelectionCheckpoint:
        return self._callback(SelectionCheckpoint)

    @property
    def timing(self) -> TimingCallback:
        return self._callback(TimingCallback)

    @property
    def losses(self) -> LossHistory:
        return self._callback(LossHistory)


class _ParseOnly(AnomalyCLI):
    """The CLI's parser and checks, without building the model, the data or the trainer."""

    def instantiate_classes(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def _set_seed(self) -> None:  # LightningCLI seeds right after parsing; nothing runs here
        pass


def config_error(args: Sequence[str] | dict[str, Any]) -> str | None:
    """What the Lightning CLI would refuse in ``args`` (arguments or a config dict: a key no class
    takes, a value of the wrong type), as its one-paragraph message; None when they parse. Builds nothing."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
            _ParseOnly(args=args, run=False)
    except SystemExit:
        text = captured.getvalue()
        text = text[text.rfind("error:"):].removeprefix("error:").strip() if "error:" in text else text.strip()
        # jsonargparse's message for a key no class takes ends with the whole nested value: name the
        # key and the options the class does take instead.
        unknown = re.search(r"Parser key \"(\w+)\".*class_path '([\w.]+)':\s+Option '(\w+)' is not accepted", text, re.S)
        if unknown:
            group, class_path, option = unknown.groups()
            options = ", ".join(_init_options(class_path)) or "none"
            return f"{group}.init_args.{option}: {class_path} takes no option {option!r}; its options: {options}"
        return text
    return None


def _init_options(class_path: str) -> list[str]:
    """The constructor arguments of ``class_path`` and of the bases its ``**kwargs`` reach."""
    module, _, name = class_path.rpartition(".")
    options: list[str] = []
    for cls in importlib.import_module(module).__dict__[name].__mro__:
        if "__init__" not in vars(cls) or cls is object:
            continue
        parameters = inspect.signature(cls.__init__).parameters.values()
        options += [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                    and p.name not in options]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return options


def run_lightning_cli(argv: list[str], from_command_line: bool = False) -> None:
    """``adbench fit|validate|test|predict ...`` through :class:`AnomalyCLI`; prints the run folder
    (and, after ``test``, the per-image scores it wrote there)."""
    if from_command_line:
        sys.argv[1:] = expand_model_names(argv)  # LightningCLI reads sys.argv itself: no "args" warning
    cli = AnomalyCLI(args=None if from_command_line else argv)
    if not cli.trainer.is_global_zero:
        return
    if cli.subcommand == "test" and cli.evaluator.test_images:
        scores = cli.evaluator.save_test_scores(Path(cli.trainer.default_root_dir) / TEST_SCORES_FILE,
                                                cli.datamodule.root)
        print(f"[adbench] per-image scores: {scores}")
    print(f"[adbench] run folder: {cli.trainer.default_root_dir}")

