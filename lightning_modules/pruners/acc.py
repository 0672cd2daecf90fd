"""ACC latency-adjustable Transformer (Kachuee and Sharifkhani, arXiv 2201.03327): Sort + Eliminate.

After layer l's attention, every example keeps N_l = max(1, floor(r_l * N_{l-1})) of its real
tokens (eq. 3, with the `rounding` below; N_{l-1} = its tokens entering the layer), with keep rate
r_l = min(1, SC * EP_l): SC is the Speedup Coefficient (the paper's alpha; smaller = faster,
changeable after training: "offline tuning") and EP the Elimination Profile. [CLS] is kept and at
least one token survives. The tokens kept are the top N_l by the score vector SV (ACC's
`sum_i mean_h P[h,i,j]`, DESIGN.md s.4), or, for the paper's Table VII ablation, the first N_l
in sequence order (`order=none`, eliminate without sorting) or random ones (`order=random`).

The paper's equations (1)-(8) did not survive in our copy of the text. Recoverable from the prose:
the score vector, ACC_l = median SV over real tokens of layer l averaged over a profiling pass,
eq. (3) and the cost model of eq. (4) (`expected_speedup`). Reconstructed (DESIGN.md s.5), and
therefore swappable settings: the fitted curve (`curve`, a polynomial of `degree` over layers),
the profile rule (`profile_rule=ratio`: EP_l = min(1, fit_l / fit_{l-1}) until the first layer
where the fit rises or is no longer positive, 1 from there on and at layer 0; `flat`: EP = 1,
keep rate SC everywhere) and the rounding of eq. (3) (`rounding`: floor, the DESIGN default; ceil; round).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokenprune.checks import check_choice, check_range
from tokenprune.engine.pruner import TokenPruner
from tokenprune.engine.scoring import keep_top
from tokenprune.engine.state import TokenState

ORDERS = ("sv", "random", "none")
ROUNDINGS = ("floor", "ceil", "round")
PROFILE_RULES = ("ratio", "flat")
CURVES = ("poly",)
ATTENTION_SHARE = 0.25  # eq. (4): about a quarter of a layer's cost comes before elimination


def fit_curve(acc: Sequence[float], curve: str = "poly", degree: int = 2) -> list[float]:
    """A smooth curve through the per-layer ACC values (the paper's red lines in Fig. 4)."""
    check_choice("pruner.curve", curve, CURVES)
    layers = np.arange(len(acc))
    coefficients = np.polyfit(layers, np.asarray(acc, dtype=float), deg=min(degree, len(acc) - 1))
    return [float(v) for v in np.polyval(coefficients, layers)]


def elimination_profile(fitted: Sequence[float], rule: str = "ratio") -> list[float]:
    """EP per layer from the fitted ACC curve (reconstruction, see the module doc)."""
    check_choice("pruner.profile_rule", rule, PROFILE_RULES)
    profile = [1.0] * len(fitted)
    if rule == "flat":
        return profile
    for layer in range(1, len(fitted)):
        if fitted[layer] >= fitted[layer - 1] or fitted[layer] <= 0:
            break  # elimination stops where the curve rises (or overshoots to <= 0); later layers keep their count
        profile[layer] = min(1.0, fitted[layer] / fitted[layer - 1])
    return profile


def keep_rates(profile: Sequence[float], speedup_coefficient: float) -> list[float]:
    """r_l = min(1, SC * EP_l)."""
    return [min(1.0, speedup_coefficient * ep) for ep in profile]


def expected_speedup(rates: Sequence[float]) -> float:
    """Eq. (4)-(7) reconstructed: L * N / sum_l (0.25 N_{l-1} + 0.75 N_l), with N_l = r_l N_{l-1}
    in fractions of the input length (no rounding: the closed form the paper tunes SC with)."""
    length, cost = 1.0, 0.0
    for rate in rates:
        kept = rate * length
        cost += ATTENTION_SHARE * length + (1 - ATTENTION_SHARE) * kept
        length = kept
    return len(rates) / cost


def coefficient_for_speedup(profile: Sequence[float], target: float, low: float = 1e-3) -> float:
    """The SC whose expected speedup is `target` (bisection; expected speedup falls as SC rises)."""
    fastest = expected_speedup(keep_rates(profile, low))
    if not 1.0 <= target <= fastest:
        raise ValueError(f"target_speedup={target} is outside what this profile allows: [1.0, {fastest:.2f}]")
    high = 1.0 / min(profile)  # every keep rate 1: speedup 1
    for _ in range(100):
        middle = (low + high) / 2
        if expected_speedup(keep_rates(profile, middle)) > target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


class ACCPruner(TokenPruner):
    """Sort + Eliminate with keep rate min(1, SC * EP_l) per layer.

    `profile` is the elimination profile (None: all ones, i.e. keep rate SC in every layer);
    `module=acc` measures it on the model it starts from and stores it, with the measured `acc`
    curve, in the pruner's settings, so a checkpoint's pruner config carries its profile.
    """

    def __init__(
        self,
        num_layers: int,
        speedup_coefficient: float = 0.9,
        profile: Sequence[float] | None = None,
        acc: Sequence[float] | None = None,
        order: str = "sv",
        rounding: str = "floor",
        curve: str = "poly",
        degree: int = 2,
        profile_rule: str = "ratio",
    ) -> None:
        super().__init__(num_layers)
        check_range("pruner.speedup_coefficient", speedup_coefficient, 0.0, 10.0, low_open=True)
        check_choice("pruner.order", order, ORDERS)
        check_choice("pruner.rounding", rounding, ROUNDINGS)
        check_choice("pruner.curve", curve, CURVES)
        check_range("pruner.degree", degree, 0, 8)
        check_choice("pruner.profile_rule", profile_rule, PROFILE_RULES)
        profile = [1.0] * num_layers if profile is None else [float(v) for v in profile]
        if len(profile) != num_layers:
            raise ValueError(f"pruner.profile has {len(profile)} entries; the backbone has {num_layers} layers")
        for layer, value in enumerate(profile):
            check_range(f"pruner.profile[{layer}]", value, 0.0, 1.0, low_open=True)
        self.speedup_coefficient = speedup_coefficient
        self.profile, self.acc = profile, None if acc is None else [float(v) for v in acc]
        self.order, self.rounding = order, rounding
        self.curve, self.degree, self.profile_rule = curve, int(degree), profile_rule
        self.needs_scores = order == "sv"

    def settings(self, **changes: Any) -> dict[str, Any]:
        """This pruner as a `_target_` config (what a search scores and caches), with `changes`."""
        return {
            "_target_": f"{type(self).__module__}.{type(self).__qualname__}",
            "speedup_coefficient": self.speedup_coefficient,
            "profile": self.profile,
            "acc": self.acc,
            "order": self.order,
            "rounding": self.rounding,
            "curve": self.curve,
            "degree": self.degree,
            "profile_rule": self.profile_rule,
        } | changes

    def with_settings(self, **changes: Any) -> ACCPruner:
        """The same pruner with some settings changed (another SC or order: offline tuning)."""
        settings = {k: v for k, v in self.settings(**changes).items() if k != "_target_"}
        return type(self)(self.num_layers, **settings)

    @property
    def rates(self) -> list[float]:
        return keep_rates(self.profile, self.speedup_coefficient)

    def keep_counts(self, layer: int, lengths: Tensor) -> Tensor:
        """N_l per example from its current real length N_{l-1} (eq. 3)."""
        kept = lengths.to(torch.float64) * self.rates[layer]
        if self.rounding == "floor":
            kept = torch.floor(kept + 1e-9)
        elif self.rounding == "ceil":
            kept = torch.ceil(kept - 1e-9)
        else:
            kept = torch.round(kept)
        return kept.long().clamp(min=1)

    def prunes_at(self, layer: int) -> bool:
        return self.rates[layer] < 1.0

    def keeps_all(self, layer: int, state: TokenState) -> bool:
        return bool((self.keep_counts(layer, state.lengths) >= state.lengths).all())

    def select(self, layer: int, scores: Tensor | None, state: TokenState) -> Tensor:
        counts = self.keep_counts(layer, state.lengths)
        if self.order == "sv":
            assert scores is not None, "order=sv: the engine passes the score vector"
            ranking = scores
        elif self.order == "random":
            ranking = torch.rand(state.mask.shape, device=state.mask.device)
        else:  # earlier positions rank higher: the first N_l tokens survive
            length = state.mask.shape[1]
            ranking = torch.arange(length, 0, -1, device=state.mask.device, dtype=torch.float32).expand_as(state.mask)
        return keep_top(ranking, state.mask, counts)


class ScoreEveryLayer(TokenPruner):
    """Keeps every token but has the engine compute the score vector in every layer (an ACC
    profiling pass reads the scores from the engine's trace)."""

    def prunes_at(self, layer: int) -> bool:
        return True

    def select(self, layer: int, scores: Tensor | None, state: TokenState) -> Tensor:
        return state.mask


def profile_from_acc(acc: Sequence[float], curve: str, degree: int, rule: str) -> tuple[list[float], list[float]]:
    """(fitted curve, elimination profile) from measured per-layer ACC values."""
    fitted = fit_curve(acc, curve, degree)
    return fitted, elimination_profile(fitted, rule)
