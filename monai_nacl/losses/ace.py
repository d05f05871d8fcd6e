"""Marginal L1 average calibration error (mL1-ACE) losses, hard- and soft-binned.

Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation", IEEE TMI
(arXiv:2506.03942). For each image ``b`` and class ``c`` (one-vs-rest), the softmax probabilities
``p_c`` of the image's valid voxels are binned into ``M`` equal-width bins over ``[0, 1]``; in each non-empty
bin ``m`` the mean predicted probability ``conf_bcm`` is compared with the observed frequency of class ``c``
``freq_bcm``:

.. math::

    \\text{ACE}_{bc} = \\frac{1}{|\\mathcal{B}_{bc}|} \\sum_{m \\in \\mathcal{B}_{bc}} |\\text{conf}_{bcm} -
    \\text{freq}_{bcm}|, \\qquad \\text{mL1-ACE} = \\operatorname{mean}_{b, c} \\text{ACE}_{bc}

with :math:`\\mathcal{B}_{bc}` the non-empty bins. The loss is computed per image and then averaged over images and
classes (the paper's "per-image" formulation), not pooled over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from monai_nacl.input_checks import check_integer, check_number
from monai_nacl.losses.baselines import CrossEntropyLoss, DiceCELoss, _SegmentationLoss

__all__ = ["binned_calibration", "HardL1ACELoss", "SoftL1ACELoss"]

MODES = ("hard", "soft")


def _bin_memberships(prob: torch.Tensor, num_bins: int, mode: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Bin indices and membership weights of each value: ``[(index, weight or None for 1), ...]``.

    ``"hard"``: bin ``floor(p * M)`` (bins ``[m/M, (m+1)/M)``, ``p = 1`` in the last bin), weight 1.
    ``"soft"``: linear interpolation between the two nearest bin centres ``(m + 1/2) / M`` (a triangular kernel
    of half-width ``1/M`` around each centre); values below the first centre or above the last belong wholly to
    the first or last bin, so every value's memberships sum to 1. The weights are differentiable in ``p``.
    """
    scaled = prob * num_bins
    if mode == "hard":
        index = scaled.detach().floor().long().clamp_(0, num_bins - 1)
        return [(index, None)]
    if num_bins == 1:
        return [(torch.zeros_like(prob, dtype=torch.long), None)]
    t = (scaled - 0.5).clamp(0.0, num_bins - 1.0)  # position on the grid of bin centres
    lower = t.detach().floor().long().clamp_(0, num_bins - 2)
    upper_weight = t - lower.to(t.dtype)
    return [(lower, 1.0 - upper_weight), (lower + 1, upper_weight)]


def binned_calibration(
    prob: torch.Tensor,
    onehot: torch.Tensor,
    valid: torch.Tensor | None = None,
    num_bins: int = 20,
    mode: str = "hard",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image and class: the (soft) count, mean probability and observed frequency of each bin.

    Args:
        prob: probabilities ``B,C,*spatial``.
        onehot: the one-hot ground truth ``B,C,*spatial`` (0 at ignored voxels is fine: ``valid`` masks them).
        valid: optional ``B,1,*spatial`` mask (1 = counts); ``None``: every voxel counts.
        num_bins: ``M``, equal-width bins over ``[0, 1]``.
        mode: ``"hard"`` or ``"soft"`` memberships (see :class:`HardL1ACELoss`, :class:`SoftL1ACELoss`).

    Returns:
        ``count, conf, freq``, each ``B,C,M``: the sum of memberships per bin, and the membership-weighted means of
        ``prob`` and ``onehot`` in it (0 where the count is 0; gradients flow through ``conf``, and in soft mode
        through the memberships too).
    """
    b, c = prob.shape[:2]
    p = prob.reshape(b, c, -1)
    y = onehot.reshape(b, c, -1).to(p.dtype)
    v = None if valid is None else valid.reshape(b, 1, -1).to(p.dtype)
    count = p.new_zeros(b, c, num_bins)
    sum_p, sum_y = p.new_zeros(b, c, num_bins), p.new_zeros(b, c, num_bins)
    for index, weight in _bin_memberships(p, num_bins, mode):
        w = torch.ones_like(p) if weight is None else weight
        if v is not None:
            w = w * v
        count = count.scatter_add(2, index, w)
        sum_p = sum_p.scatter_add(2, index, w * p)
        sum_y = sum_y.scatter_add(2, index, w * y)
    nonzero = count != 0  # NaN counts (NaN logits in soft mode) propagate, so the loss reports them
    safe = torch.where(nonzero, count, torch.ones_like(count))
    return count, torch.where(nonzero, sum_p / safe, 0.0), torch.where(nonzero, sum_y / safe, 0.0)


class _L1ACELoss(_SegmentationLoss):
    """mL1-ACE (per image, mean over images and classes), optionally added to a CE or Dice+CE base term."""

    mode = "hard"

    def __init__(
        self,
        num_classes: int,
        num_bins: int = 20,
        include_background: bool = True,
        ignore_index: int | None = None,
        base: str | None = None,
        ace_weight: float = 1.0,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        empty_weight: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, ignore_index, None, reduction)
        self.num_bins = check_integer(num_bins, "num_bins", minimum=1)
        if not isinstance(include_background, bool):
            raise ValueError(f"include_background must be True or False, got {include_background!r}.")
        self.include_background = include_background
        if base not in (None, "ce", "dice_ce"):
            raise ValueError(f"base must be None, 'ce' or 'dice_ce', got {base!r}.")
        self.base = base
        self.ace_weight = check_number(ace_weight, "ace_weight", minimum=0.0)
        self.empty_weight = check_number(empty_weight, "empty_weight", minimum=0.0)
        if base == "ce":
            self.base_loss = CrossEntropyLoss(self.num_classes, self.ignore_index, reduction=reduction)
        elif base == "dice_ce":
            self.base_loss = DiceCELoss(
                self.num_classes, self.ignore_index, lambda_dice=lambda_dice, lambda_ce=lambda_ce, reduction=reduction
            )
        else:
            self.base_loss = None
        self.last_components: dict[str, torch.Tensor] = {}

    def ace(
        self, input: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and class ACE, ``B,C'`` (``C' = C``, or ``C - 1`` without background).

        Args:
            input: logits ``B,C,*spatial``.
            index: labels ``B,1,*spatial`` as int64 (any class at ignored voxels).
            valid: ``B,1,*spatial`` mask of the voxels that count, or ``None``.

        Returns:
            ``(ace, counted)``: the ACE values (0 for image-class pairs without a non-empty bin, e.g. an image whose
            voxels are all ignored) and a bool mask of the pairs that have one.
        """
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()
        prob = torch.softmax(x, dim=1)
        onehot = F.one_hot(index[:, 0], self.num_classes).movedim(-1, 1).to(prob.dtype)
        if not self.include_background:
            prob, onehot = prob[:, 1:], onehot[:, 1:]
        count, conf, freq = binned_calibration(prob, onehot, valid, self.num_bins, self.mode)
        full = ~(count <= self.empty_weight)  # NaN counts count (and make the loss NaN)
        n_full = full.sum(-1)
        gap = torch.where(full, (conf - freq).abs(), 0.0).sum(-1)
        counted = n_full > 0
        return torch.where(counted, gap / n_full.clamp_min(1), 0.0), counted

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``B,C,*spatial`` (2D or 3D); softmax is applied here.
            target: labels ``B,1,*spatial`` / ``B,*spatial`` or a hard one-hot ``B,C,*spatial``.

        Returns:
            ``base + ace_weight * mL1-ACE`` (a scalar); without a base, ``ace_weight * mL1-ACE``.
            ``self.last_components`` holds the detached ``ace`` (unweighted) and, with a base, ``base``.

        Raises:
            ValueError: wrong channel count or dims, target shape mismatch, bad label values (see
                :func:`monai_nacl.input_checks.labels_from_target`), or a non-finite loss (naming the logits).
        """
        input, labels, index, valid = self._prepare(input, target)
        per_image, counted = self.ace(input, index, valid)
        ace = per_image.sum()
        if self.reduction == "mean":
            n = counted.sum()
            ace = torch.where(n > 0, ace / n.clamp_min(1), 0.0)
        total = self.ace_weight * ace
        components = {"ace": ace.detach()}
        if self.base_loss is not None:
            base = self.base_loss(input, labels)
            total = total + base
            components["base"] = base.detach()
        total = self._checked(total.to(input.dtype), input)
        self.last_components = components
        return total


class HardL1ACELoss(_L1ACELoss):
    """Hard-binned mL1-ACE loss (Barfoot et al., IEEE TMI; arXiv:2506.03942).

    Each voxel's class-``c`` probability falls in exactly one of ``M`` equal-width bins ``[m/M, (m+1)/M)`` (1.0 in
    the last); per image and class, ``ACE = mean over non-empty bins |mean p - frequency of c|``; the loss is the
    mean over images and classes. The bin assignment is a step function (no gradient); the gradient flows through
    the per-bin mean probabilities.

    Args:
        num_classes: number of classes ``C`` (channels of the logits).
        num_bins: ``M`` (an integer >= 1); the paper uses 20.
        include_background: ``False`` leaves class 0 out of the mean over classes.
        ignore_index: label value whose voxels enter no bin (and no base term).
        base: ``None`` (ACE alone), ``"ce"`` or ``"dice_ce"`` (:class:`~monai_nacl.losses.DiceCELoss`, as the paper
            trains): ``loss = base + ace_weight * mL1-ACE``.
        ace_weight: weight of the ACE term (finite, >= 0).
        lambda_dice, lambda_ce: weights inside the ``"dice_ce"`` base.
        empty_weight: a bin counts when its voxel count exceeds this (default 0: any voxel).
        reduction: ``"mean"`` over image-class pairs (pairs of an image whose voxels are all ignored are left out;
            0 with a zero gradient when none counts) or ``"sum"`` over them (base terms use the same reduction).

    Raises:
        ValueError: ``num_classes``, ``num_bins`` (< 1 or not an integer), ``include_background`` (not a bool),
            ``base``, ``ace_weight``, ``empty_weight``, ``ignore_index`` or ``reduction`` invalid; in ``forward``,
            see :meth:`forward`.

    Example:
        >>> loss_fn = HardL1ACELoss(num_classes=3, base="dice_ce")
        >>> logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
        >>> loss_fn(logits, torch.randint(0, 3, (2, 1, 8, 8, 8))).backward()
        >>> sorted(loss_fn.last_components)
        ['ace', 'base']
    """

    mode = "hard"


class SoftL1ACELoss(_L1ACELoss):
    """Soft-binned mL1-ACE loss (Barfoot et al., IEEE TMI; arXiv:2506.03942): differentiable bin memberships.

    Each probability is shared between the two nearest of the ``M`` bin centres ``(m + 1/2) / M`` by linear
    interpolation (a triangular kernel of half-width ``1/M``; below the first or above the last centre it belongs
    wholly to that bin), so memberships sum to 1 and depend smoothly on the probability. Per image and class, each
    bin's mean probability and class frequency are membership-weighted means; bins whose total membership is at
    most ``empty_weight`` (default 0.01, as the authors' code) are empty and left out. ``ACE`` is the mean over
    the other bins of ``|mean p - frequency|``, and the loss the mean over images and classes.

    Args:
        num_classes, num_bins, include_background, ignore_index, base, ace_weight, lambda_dice, lambda_ce,
        reduction: as :class:`HardL1ACELoss`.
        empty_weight: total membership at or below which a bin is empty (finite, >= 0).

    Raises:
        ValueError: as :class:`HardL1ACELoss`.

    Example:
        >>> loss_fn = SoftL1ACELoss(num_classes=3, num_bins=20)
        >>> logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
        >>> loss_fn(logits, torch.randint(0, 3, (2, 1, 8, 8, 8))).backward()
    """

    mode = "soft"

    def __init__(
        self,
        num_classes: int,
        num_bins: int = 20,
        include_background: bool = True,
        ignore_index: int | None = None,
        base: str | None = None,
        ace_weight: float = 1.0,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        empty_weight: float = 0.01,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            num_classes,
            num_bins,
            include_background,
            ignore_index,
            base,
            ace_weight,
            lambda_dice,
            lambda_ce,
            empty_weight,
            reduction,
        )
