"""Token bookkeeping for the prunable encoder: which tokens survive, where they came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TokenState:
    """The tokens currently alive in a batch.

    hidden:    (B, n, d) hidden states of the current tokens
    mask:      (B, n) bool, True for real (non-padding, not pruned) tokens
    positions: (B, n) long, index of each token in the original input sequence
    input_lengths: (B,) long, real tokens each example had when it entered the encoder
    """

    hidden: Tensor
    mask: Tensor
    positions: Tensor
    input_lengths: Tensor
    known_lengths: Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def start(cls, hidden: Tensor, attention_mask: Tensor) -> TokenState:
        batch, length = attention_mask.shape
        positions = torch.arange(length, device=hidden.device).expand(batch, length)
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)
        return cls(hidden=hidden, mask=mask, positions=positions, input_lengths=lengths, known_lengths=lengths)

    @property
    def lengths(self) -> Tensor:
        """Real tokens per example, (B,); counted once per state (every layer reads it)."""
        if self.known_lengths is None:
            self.known_lengths = self.mask.sum(dim=1)
        return self.known_lengths

    def additive_mask(self, dtype: torch.dtype, causal: bool = False) -> Tensor:
        """Mask to add to attention logits: 0 where a query may attend, dtype-min elsewhere.

        (B, 1, 1, n): every query sees the real keys. causal: (B, 1, n, n), a query sees the real
        keys whose ORIGINAL position is at most its own (kept tokens stay in order, so this is the
        stock causal mask restricted to the tokens still alive).
        """
        if not causal:
            return torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill(
                ~self.mask, torch.finfo(dtype).min
            )[:, None, None, :]
        visible = self.mask[:, None, :] & (self.positions[:, None, :] <= self.positions[:, :, None])
        return torch.zeros(visible.shape, dtype=dtype, device=self.mask.device).masked_fill(
            ~visible, torch.finfo(dtype).min
        )[:, None]

    def gather_index(self, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Turn a (B, n) keep mask into slot indices (B, m) and the new mask (B, m).

        Kept tokens come first, in their original order, so [CLS] stays in slot 0; m is the
        longest kept row of the batch and shorter rows are padded with masked slots.
        """
        keep = keep & self.mask
        width = max(int(keep.sum(dim=1).max()), 1)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        return order, keep.gather(1, order)

    def select(self, index: Tensor, new_mask: Tensor, hidden: Tensor, new_lengths: Tensor | None = None) -> TokenState:
        """State for the kept slots `index` whose new hidden states are `hidden` (B, m, d);
        new_lengths: new_mask's row sums, when the caller has counted them."""
        return TokenState(hidden, new_mask, self.positions.gather(1, index), self.input_lengths, new_lengths)

    def with_hidden(self, hidden: Tensor) -> TokenState:
        """Same tokens, new hidden states."""
        return TokenState(hidden, self.mask, self.positions, self.input_lengths, self.known_lengths)

    def newest_first(self) -> tuple[TokenState, Tensor]:
        """This state with each row's newest (last real) token moved to slot 0, the other tokens
        in their order, and the slot order used, (B, n): the view a pruner gets when the adapter
        protects the newest token (pruners protect slot 0, TokenPruner's contract)."""
        slots = torch.arange(self.mask.shape[1], device=self.mask.device).expand_as(self.mask)
        newest = torch.where(self.mask, slots, 0).amax(dim=1, keepdim=True)
        order = torch.where(slots == 0, newest, torch.where(slots <= newest, slots - 1, slots))
        view = TokenState(
            self.hidden.gather(1, order[..., None].expand_as(self.hidden)),
            self.mask.gather(1, order),
            self.positions.gather(1, order),
            self.input_lengths,
            self.known_lengths,
        )
        return view, order


@dataclass
class LayerTrace:
    """What one layer did, per example: the counts the FLOPs counter and the logs need.

    n_in: real tokens entering; n_query: query rows whose attention logits were computed;
    n_out: real tokens leaving (whose context, out-projection and FFN are counted as computed;
        a scoring layer at inference computes every row's context with its scores, README FLOPs);
    heads: attention heads used; scored: whether the score vector was computed;
    soft_mask: soft token weights (B, n) if the pruner gave any.
    """

    n_in: Tensor
    n_query: Tensor
    n_out: Tensor
    heads: int
    skipped: bool = False
    scored: bool = False
    soft_mask: Tensor | None = None
    scores: Tensor | None = None
    score_mask: Tensor | None = None


@dataclass
class EncoderOutput:
    """Final hidden states (pruned, or restored to full length) and the per-layer trace."""

    hidden: Tensor
    mask: Tensor
    positions: Tensor
    trace: list[LayerTrace] = field(default_factory=list)
