"""Rebuild a method module from a checkpoint, read safely (tokenprune.checkpoints)."""

from __future__ import annotations

import inspect
from pathlib import Path

from hydra.utils import get_class

from tokenprune.checkpoints import read_checkpoint
from tokenprune.modules.base import TokenPruningModule

MODULE_PACKAGE = "tokenprune.modules."


def module_class(name: str, path: str | Path) -> type[TokenPruningModule]:
    """The method module class a checkpoint names, which must be a tokenprune module."""
    cls = get_class(name) if name.startswith(MODULE_PACKAGE) else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, TokenPruningModule)):
        raise ValueError(f"{path} names module_class={name}, which is not a tokenprune method module")
    return cls


def load_module(path: str | Path) -> TokenPruningModule:
    """The module that wrote the checkpoint at `path`, with its weights, on CPU."""
    checkpoint = read_checkpoint(path)
    cls = module_class(checkpoint["module_class"], path)
    accepted = inspect.signature(cls.__init__).parameters
    settings = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    module = cls(**{**settings, "init_from": None})
    module.load_state_dict(checkpoint["state_dict"])
    return module
