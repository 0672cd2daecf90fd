"""ACC's inference-time knob, the Speedup Coefficient (Kachuee and Sharifkhani, arXiv 2201.03327).

* ACCSpeedup (`search=acc_speedup`): the SC for a target speedup (with the checkpoint's profile;
  a checkpoint from before ACC training, e.g. the fine-tuned one, gets a flat profile). `objective=flops`: the closed
  form of eq. (4)-(7) (pruners/acc.expected_speedup) inverted by bisection, with the exact FLOPs
  ratio of that SC on the val split's real lengths; `objective=latency`: measured speedups of a
  few calibration SCs on this device, interpolated, and the interpolated SC measured again.
* ACCOfflineTuning (`search=acc_offline`): one trained model evaluated over a grid of SC values
  (and, for the Table VII ablation, elimination orders) without training: val and report
  score (the task's main metric: accuracy, or perplexity for causal LM), FLOPs ratio, expected
  and measured speedup, and which rows are on the val split's score-vs-FLOPs front (by the
  task's main_mode); CSV and the paper's Figure 6 as PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from tokenprune.checks import check_choice, check_range
from tokenprune.engine.flops import EncoderDims, layer_macs, unpruned_macs
from tokenprune.pruners.acc import ORDERS, ACCPruner, coefficient_for_speedup, expected_speedup
from tokenprune.search.context import SearchContext, SearchStrategy
from tokenprune.search.pareto import on_front

OBJECTIVES = ("flops", "latency")


def acc_flops_ratio(dims: EncoderDims, lengths: Sequence[int], pruner: ACCPruner) -> float:
    """Relative FLOPs of `pruner` on examples of `lengths` real tokens (analytic, DESIGN.md s.4)."""
    inputs = torch.as_tensor(list(lengths))
    current, total = inputs, torch.zeros(inputs.shape, dtype=torch.float64)
    for layer in range(dims.num_layers):
        kept = torch.minimum(pruner.keep_counts(layer, current), current) if pruner.prunes_at(layer) else current
        total = total + layer_macs(dims, current, current, kept, dims.num_heads, scored=kept < current)
        current = kept
    return float(total.sum() / unpruned_macs(dims, inputs).sum())


def checkpoint_acc_pruner(context: SearchContext) -> ACCPruner:
    if not isinstance(context.checkpoint_pruner, ACCPruner):
        raise ValueError(
            "this search needs an ACC checkpoint (module=acc pruner=acc, e.g. experiment=acc); "
            f"the checkpoint's pruner is {type(context.checkpoint_pruner).__name__}"
        )
    return context.checkpoint_pruner


class ACCSpeedup(SearchStrategy):
    """The Speedup Coefficient that gives `target_speedup` (expected, or measured on this device)."""

    def __init__(
        self,
        target_speedup: float = 2.0,
        objective: str = "flops",
        calibration: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    ) -> None:
        check_range("target_speedup", target_speedup, 1.0, 100.0)
        check_choice("search.objective", objective, OBJECTIVES)
        if len(calibration) < 2:
            raise ValueError(f"search.calibration={list(calibration)} needs at least two SC values")
        for index, value in enumerate(calibration):
            check_range(f"search.calibration[{index}]", value, 0.0, 10.0, low_open=True)
        self.target, self.objective, self.calibration = target_speedup, objective, sorted(calibration)

    def run(self, context: SearchContext) -> list[dict[str, Any]]:
        # before ACC training (e.g. on the fine-tuned checkpoint) there is no profile yet: flat
        pruner = context.checkpoint_pruner
        if not isinstance(pruner, ACCPruner):
            pruner = ACCPruner(context.dims.num_layers)
        coefficient = coefficient_for_speedup(pruner.profile, self.target)
        if self.objective == "latency":
            assert context.measure is not None, "the app measures latency"
            measured = context.measure([pruner.settings(speedup_coefficient=sc) for sc in self.calibration])
            coefficient = self.interpolated(measured)
        candidate = pruner.with_settings(speedup_coefficient=coefficient)
        config = candidate.settings()
        record = context.score(f"speedup_coefficient={coefficient:.4f}", config)
        result = record | {
            "speedup_coefficient": coefficient,
            "target_speedup": self.target,
            "expected_speedup": expected_speedup(candidate.rates),
            "exact_flops_ratio": acc_flops_ratio(context.dims, context.lengths, candidate),
        }
        if self.objective == "latency":
            assert context.measure is not None
            result["measured_speedup"] = context.measure([config])[0]
            result["calibration"] = dict(zip(self.calibration, measured, strict=True))
        print(
            f"SC {coefficient:.4f} for a target speedup of {self.target}: expected speedup "
            f"{result['expected_speedup']:.3f}x, exact FLOPs ratio {result['exact_flops_ratio']:.3f} "
            f"({1 / result['exact_flops_ratio']:.3f}x fewer FLOPs)"
            + (f", measured {result['measured_speedup']:.3f}x" if "measured_speedup" in result else "")
        )
        return [result]

    def interpolated(self, measured: Sequence[float]) -> float:
        """The SC whose speedup is the target, interpolated between the calibration SCs' measured
        speedups (ordered by speedup: timings of close SCs may cross); refused outside them."""
        order = np.argsort(measured, kind="stable")
        speedups, coefficients = np.asarray(measured)[order], np.asarray(self.calibration)[order]
        if not speedups[0] <= self.target <= speedups[-1]:
            raise ValueError(
                f"target_speedup={self.target} is outside the speedups measured on this device at "
                f"search.calibration={self.calibration} ({speedups[0]:.3f}x to {speedups[-1]:.3f}x); "
                "widen search.calibration"
            )
        return float(np.interp(self.target, speedups, coefficients))


class ACCOfflineTuning(SearchStrategy):
    """One trained ACC model over a grid of Speedup Coefficients (and elimination orders)."""

    def __init__(
        self,
        values: Sequence[float] = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2),
        orders: Sequence[str] = ("sv",),
        measure: bool = True,
    ) -> None:
        if not values:
            raise ValueError("search.values is empty")
        for index, value in enumerate(values):
            check_range(f"search.values[{index}]", value, 0.0, 10.0, low_open=True)
        for order in orders:
            check_choice("search.orders", order, ORDERS)
        self.values, self.orders, self.measure = list(values), list(orders), measure

    def run(self, context: SearchContext) -> list[dict[str, Any]]:
        pruner = checkpoint_acc_pruner(context)
        candidates = [
            pruner.with_settings(speedup_coefficient=sc, order=order) for order in self.orders for sc in self.values
        ]
        configs = [candidate.settings() for candidate in candidates]
        rows = []
        for candidate, config in zip(candidates, configs, strict=True):
            key = f"order={config['order']} speedup_coefficient={config['speedup_coefficient']}"
            val = context.score(key, config)
            report = context.score(key, config, split="report")
            rows.append(
                val
                | {
                    "order": config["order"],
                    "speedup_coefficient": config["speedup_coefficient"],
                    "report_score": report["score"],
                    "report_flops_ratio": report["flops_ratio"],
                    "expected_speedup": expected_speedup(candidate.rates),
                    "metric": context.main_metric,
                    "main_mode": context.main_mode,
                }
            )
        table = pd.DataFrame(rows)
        for row, member in zip(rows, on_front(table, "score", "flops_ratio", context.main_mode), strict=True):
            row["val_front"] = bool(member)
        if self.measure:
            assert context.measure is not None, "the app measures latency"
            for row, speedup in zip(rows, context.measure(configs), strict=True):
                row["measured_speedup"] = speedup
                row["measured_over_flops_speedup"] = speedup * row["report_flops_ratio"]
        return rows

    def write_outputs(self, out: Path, candidates: pd.DataFrame) -> Path:
        """offline_tuning.csv and the paper's Figure 6 (the task's score and speedup against SC)."""
        table = candidates.drop(columns=["pruner"], errors="ignore")
        table.to_csv(out / "offline_tuning.csv", index=False)
        figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
        for order, group in table.groupby("order"):
            group = group.sort_values("speedup_coefficient")
            left.plot(group.speedup_coefficient, group.report_score, marker="o", label=f"report split, {order}")
            right.plot(group.speedup_coefficient, group.expected_speedup, marker="o", label=f"expected, {order}")
            right.plot(group.speedup_coefficient, 1 / group.report_flops_ratio, marker="s", label=f"FLOPs, {order}")
            if "measured_speedup" in group:
                right.plot(group.speedup_coefficient, group.measured_speedup, marker="^", label=f"measured, {order}")
        left.set_xlabel("speedup coefficient")
        left.set_ylabel(str(table.metric.iloc[0]))
        right.set_xlabel("speedup coefficient")
        right.set_ylabel("speedup over the unpruned model")
        for axes in (left, right):
            axes.grid(alpha=0.3)
            axes.legend(fontsize=7)
        figure.tight_layout()
        path = out / "offline_tuning.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path
