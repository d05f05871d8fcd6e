"""A loss over the deep-supervision heads of a network such as MONAI's ``DynUNet``, prior included."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.modules.loss import _Loss

__all__ = ["DeepSupervisionLoss"]


class DeepSupervisionLoss(_Loss):
    """Weighted sum of ``loss`` over the heads of a deep-supervised output; a plain output is passed through.

    MONAI's ``DynUNet(deep_supervision=True)`` returns, in training mode, the main output and its deep-supervision
    heads stacked on axis 1 (``B, 1 + deep_supr_num, C, *spatial``), every head already at the input resolution,
    so each head is compared with the full-resolution labels and the same neighbour prior. Head ``i`` weighs
    ``0.5**i`` (normalised to sum 1), as in nnU-Net. A prior set with :meth:`use_prior_once` (e.g. by
    :class:`~monai_nacl.handlers.PriorFromBatch`) reaches every head of that call. MONAI's own
    ``DeepSupervisionLoss`` takes no prior, hence this wrapper.

    Args:
        loss: the loss of one head, called as ``loss(head, target)`` or ``loss(head, target, prior)``.
        weights: one weight per head (normalised); default ``0.5**i``.

    Raises:
        ValueError: ``weights`` empty, negative or all zero; at call time, an output whose number of heads differs
            from ``weights`` (when given), or a prior for a loss that takes none.

    Example:
        >>> from monai_nacl.losses import NACLLoss
        >>> loss = DeepSupervisionLoss(NACLLoss(num_classes=3))
        >>> out = torch.randn(2, 3, 3, 8, 8, 8)  # B, heads, C, *spatial
        >>> value = loss(out, torch.randint(0, 3, (2, 1, 8, 8, 8)))
    """

    def __init__(self, loss: torch.nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if weights is not None:
            w = [float(x) for x in weights]
            if not w or any(x < 0 or x != x for x in w) or sum(w) <= 0:
                raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}.")
        self.loss, self.weights = loss, None if weights is None else list(weights)
        self._next_prior: torch.Tensor | None = None

    @property
    def last_components(self) -> dict:
        """The wrapped loss's components of its last call (the last head)."""
        return getattr(self.loss, "last_components", {})

    def use_prior_once(self, prior: torch.Tensor) -> None:
        """Make the next call give this prior to every head, then forget it (see ``NACLLoss.use_prior_once``)."""
        if not isinstance(prior, torch.Tensor):
            raise ValueError(f"prior must be a torch.Tensor, got {type(prior).__name__}.")
        self._next_prior = prior

    def _head_weights(self, n: int, device) -> torch.Tensor:
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"the output has {n} deep-supervision heads, weights has {len(self.weights)}.")
        w = torch.tensor(self.weights if self.weights is not None else [0.5**i for i in range(n)], device=device)
        return w / w.sum()

    def forward(self, input: torch.Tensor, target: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: ``B, C, *spatial`` (one head) or ``B, H, C, *spatial`` (``H`` heads, main output first); a list
                or tuple of ``B, C, *spatial`` heads is accepted too.
            target: labels as the wrapped loss takes them, at the heads' resolution.
            prior: optional τ ``B, C, *spatial`` for every head.
        """
        pending, self._next_prior = self._next_prior, None  # one call only, even if this call raises
        prior = pending if prior is None else prior
        if prior is not None and not hasattr(self.loss, "use_prior_once"):
            raise ValueError(f"{type(self.loss).__name__} takes no prior; drop the prior (or PriorFromBatch).")
        if isinstance(input, (list, tuple)):
            heads = list(input)
        elif input.dim() == target.dim() + 1:
            heads = list(torch.unbind(input, dim=1))
        else:
            heads = [input]
        weights = self._head_weights(len(heads), heads[0].device)
        total = 0.0
        for w, head in zip(weights, heads):
            value = self.loss(head, target) if prior is None else self.loss(head, target, prior)
            total = total + w * value
        return total
