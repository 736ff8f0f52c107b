"""A small registry, timm style: methods register under a short name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .base import AnomalyModule

_MODELS: dict[str, type[AnomalyModule]] = {}

M = TypeVar("M", bound=type[AnomalyModule])


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make a method available as ``name`` to the CLI and the benchmark."""

    def decorate(cls: M) -> M:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_MODELS[name]}")
        _MODELS[name] = cls
        cls.registry_name = name
        return cls

    return decorate


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_model_class(name: str) -> type[AnomalyModule]:
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def create_model(name: str, **kwargs: Any) -> AnomalyModule:
    return get_model_class(name)(**kwargs)
