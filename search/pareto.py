"""Accuracy-vs-FLOPs fronts: non-dominated sorting and hypervolume from pymoo, and the plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting


def _objectives(table: pd.DataFrame, score: str, flops: str) -> np.ndarray:
    """Both minimised: relative FLOPs and negative score."""
    return np.column_stack([table[flops].to_numpy(float), -table[score].to_numpy(float)])


def pareto_front(table: pd.DataFrame, score: str, flops: str) -> pd.DataFrame:
    """The non-dominated rows (higher score, lower FLOPs), sorted by FLOPs."""
    if table.empty:
        return table
    front = NonDominatedSorting().do(_objectives(table, score, flops), only_non_dominated_front=True)
    return table.iloc[np.sort(front)].sort_values(flops).reset_index(drop=True)


def hypervolume(table: pd.DataFrame, score: str, flops: str, reference: tuple[float, float] = (1.1, 0.0)) -> float:
    """Area dominated by the points, bounded by FLOPs ratio <= reference[0], score >= reference[1]."""
    if table.empty:
        return 0.0
    return float(HV(ref_point=np.array([reference[0], -reference[1]]))(_objectives(table, score, flops)))


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
