"""Learning-rate schedules as `_partial_` configs: `scheduler(optimizer, total_steps=...)`."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_linear_schedule_with_warmup


def linear_warmup(optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up over `warmup_ratio` of the steps, then linear decay to 0 (BERT fine-tuning)."""
    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
