"""What the command-line apps share that needs no model or framework: a refused setting as a
one-line message, argparse types for comma-separated values, and the variable naming a sweep's
W&B group. Standard library only, so the report apps (table, ledger, compare) start in about a
second instead of spending several importing torch and Lightning."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

GROUP_ENV = "TOKENPRUNE_GROUP"  # the W&B group of every run of a sweep (the scripts in sweeps/ export it)

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError)


@contextmanager
def refusals_as_messages() -> Iterator[None]:
    """A refused setting or file ends the app with its one-line message and exit code 1, not a
    traceback (set TOKENPRUNE_TRACEBACK=1 to see one)."""
    try:
        yield
    except USER_ERRORS as error:
        if os.environ.get("TOKENPRUNE_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def fractions(option: str) -> Callable[[str], list[float]]:
    """An argparse type: comma-separated relative-FLOPs levels, each in (0, 1]; a bad value is
    reported naming `option`."""

    def parse(text: str) -> list[float]:
        try:
            values = [float(item) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option}={text}: give comma-separated numbers in (0, 1]") from None
        if any(not 0 < value <= 1 for value in values):
            raise argparse.ArgumentTypeError(f"{option}={text}: each level must be in (0, 1]")
        return values

    return parse


def integer_set(option: str) -> Callable[[str], set[int]]:
    """An argparse type: comma-separated integers such as seeds (`1,3` -> {1, 3}); a bad value is
    reported naming `option`."""

    def parse(text: str) -> set[int]:
        try:
            return {int(item) for item in text.split(",")}
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option}={text}: give comma-separated integers, e.g. 1,3") from None

    return parse
