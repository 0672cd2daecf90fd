"""Hydra/omegaconf helpers: plain hyperparameters and readable instantiation errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(value: Any) -> Any:
    """OmegaConf nodes -> resolved Python containers (hyperparameters stay plain data)."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


@contextmanager
def plain_errors() -> Iterator[None]:
    """Re-raise the error a `_target_` raised instead of Hydra's nested InstantiationException,
    so a bad setting reads as e.g. `pruner.keep_ratio=1.5 is outside the allowed range (0.0, 1.0]`."""
    try:
        yield
    except InstantiationException as error:
        cause: BaseException = error
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        raise cause from None
