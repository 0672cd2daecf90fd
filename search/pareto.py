"""Score-vs-FLOPs fronts: non-dominated sorting and hypervolume from pymoo, and the plot.

`mode` is the task's `main_mode`: `max` (accuracy, F1: higher is better) or `min` (perplexity:
lower is better); FLOPs are always minimised.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from tokenprune.checks import check_choice

MODES = ("max", "min")


def _objectives(table: pd.DataFrame, score: str, flops: str, mode: str) -> np.ndarray:
    """Both minimised: relative FLOPs and the score (negated when higher is better)."""
    check_choice("task.main_mode", mode, MODES)
    sign = -1.0 if mode == "max" else 1.0
    return np.column_stack([table[flops].to_numpy(float), sign * table[score].to_numpy(float)])


def on_front(table: pd.DataFrame, score: str, flops: str, mode: str = "max") -> np.ndarray:
    """A bool per row: not dominated (no other row has a better-or-equal score at lower-or-equal FLOPs)."""
    member = np.zeros(len(table), dtype=bool)
    if not table.empty:
        member[NonDominatedSorting().do(_objectives(table, score, flops, mode), only_non_dominated_front=True)] = True
    return member


def pareto_front(table: pd.DataFrame, score: str, flops: str, mode: str = "max") -> pd.DataFrame:
    """The non-dominated rows (better score by `mode`, lower FLOPs), sorted by FLOPs."""
    if table.empty:
        return table
    return table[on_front(table, score, flops, mode)].sort_values(flops).reset_index(drop=True)


def hypervolume(
    table: pd.DataFrame,
    score: str,
    flops: str,
    reference: tuple[float, float | None] = (1.1, None),
    mode: str = "max",
) -> float:
    """Area dominated by the points, bounded by FLOPs ratio <= reference[0] and the score
    reference[1]: by default 0 for `max` (scores in [0, 1]), and for `min` (unbounded scores such
    as perplexity) the worst score in `table`, so `min` volumes compare within one table only."""
    if table.empty:
        return 0.0
    worst = reference[1]
    if worst is None:
        worst = 0.0 if mode == "max" else float(table[score].max())
    sign = -1.0 if mode == "max" else 1.0
    return float(HV(ref_point=np.array([reference[0], sign * worst]))(_objectives(table, score, flops, mode)))


def plot_fronts(
    curves: dict[str, pd.DataFrame],
    score: str,
    flops: str,
    path: Path,
    title: str,
    unpruned: tuple[float, float] | None = None,
) -> Path:
    """Score vs FLOPs, one line per named curve, the unpruned model (x, y) as a star."""
    figure, axes = plt.subplots(figsize=(6, 4.2))
    for name, table in curves.items():
        ordered = table.sort_values(flops)
        axes.plot(ordered[flops], ordered[score], marker="o", label=name)
    if unpruned is not None:
        axes.scatter([unpruned[0]], [unpruned[1]], marker="*", s=160, color="black", label="unpruned", zorder=5)
    axes.set_xlabel("GFLOPs per example" if flops == "gflops" else "relative FLOPs (analytic, real lengths)")
    axes.set_ylabel(score)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_pareto(
    methods: dict[str, pd.DataFrame],
    score: str,
    flops: str,
    path: Path,
    title: str,
    mode: str = "max",
    unpruned: tuple[float, float] | None = None,
) -> Path:
    """Score vs FLOPs per method: every point (faint) and the method's Pareto front as a staircase
    (the best score reachable at or below each FLOPs level), the unpruned model as a star."""
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for index, (name, table) in enumerate(methods.items()):
        color = f"C{index % 10}"
        axes.scatter(table[flops], table[score], color=color, alpha=0.3, s=16)
        front = pareto_front(table, score, flops, mode)
        axes.step(front[flops], front[score], where="post", color=color, marker="o", label=name)
    if unpruned is not None:
        axes.scatter([unpruned[0]], [unpruned[1]], marker="*", s=160, color="black", label="unpruned", zorder=5)
    axes.set_xlabel("relative FLOPs" if flops == "flops_ratio" else flops)
    axes.set_ylabel(score)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if methods or unpruned is not None:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
