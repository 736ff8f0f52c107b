"""Datasets by name: ``--data visa`` on the command line, ``dataset: visa`` in a sweep.

Like the model registry: a dataset's file decorates its ``AnomalyDataModule`` subclass
with :func:`register_dataset` and ``datamodules/__init__.py`` imports the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .base import AnomalyDataModule

_DATASETS: dict[str, type[AnomalyDataModule]] = {}
T = TypeVar("T", bound="type[AnomalyDataModule]")


def register_dataset(name: str) -> Callable[[T], T]:
    """Class decorator: make a datamodule selectable as ``name``."""

    def decorate(cls: T) -> T:
        if name in _DATASETS and _DATASETS[name] is not cls:
            raise ValueError(f"dataset name {name!r} is already registered by {_DATASETS[name].__qualname__}")
        cls.dataset_name = name
        _DATASETS[name] = cls
        return cls

    return decorate


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_dataset_class(name: str) -> type[AnomalyDataModule]:
    try:
        return _DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; registered: {', '.join(list_datasets())}") from None


def dataset_class_path(name: str) -> str:
    """``module.Class`` of a registered dataset (what LightningCLI's ``--data`` takes)."""
    cls = get_dataset_class(name)
    return f"{cls.__module__}.{cls.__qualname__}"
