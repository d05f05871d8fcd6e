"""Calibration baselines with the same conventions as :class:`~monai_nacl.losses.NACLLoss`.

Every loss takes logits ``B,C,*spatial`` and labels ``B,1,*spatial`` / ``B,*spatial`` / one-hot, honours
``ignore_index`` (voxels excluded from every term) and averages over valid voxels, so benchmarks compare
like with like. Where MONAI has the loss (Dice, focal) it is used for the per-voxel values; the rest are a few
tensor ops. A batch in which no voxel counts (every voxel is ``ignore_index``, or every valid voxel's class has
weight 0) gives 0 with a zero gradient for that term, as :class:`~monai_nacl.losses.NACLLoss` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.losses import FocalLoss as _MonaiFocalLoss
from torch.nn.modules.loss import _Loss

from monai_nacl.input_checks import (
    as_tensor,
    check_class_weight,
    check_ignore_index,
    check_logits,
    check_num_classes,
    check_number,
    check_prior,
    labels_from_target,
    non_finite_error,
)
from monai_nacl.neighbor_prior import check_kernel_size, check_sigma, ensure_kernel_size, ensure_sigma, neighbor_prior

__all__ = ["CrossEntropyLoss", "DiceCELoss", "LabelSmoothingLoss", "FocalLoss", "ECPLoss", "MbLSLoss", "SVLSLoss"]


class _SegmentationLoss(_Loss):
    """Shared target handling: validation, ignore mask and the mean over valid voxels.

    Raises:
        ValueError: in the constructor, ``num_classes``, ``ignore_index`` (an integer or ``None``), ``weight``
            (``C`` finite non-negative values, one > 0) or ``reduction`` invalid; in ``forward``, bad shapes or
            labels (see :func:`monai_nacl.input_checks.labels_from_target`) or a non-finite loss, naming the
            argument responsible.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        weight: Sequence[float] | torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        num_classes = check_num_classes(num_classes)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        self.num_classes = int(num_classes)
        self.ignore_index = check_ignore_index(ignore_index)
        self.register_buffer("class_weight", check_class_weight(weight, self.num_classes))

    def _prepare(self, input: torch.Tensor, target: torch.Tensor):
        """Return plain logits, the original labels, an int64 index (0 where ignored) and the valid mask."""
        input = as_tensor(input)
        check_logits(input, self.num_classes)
        labels = labels_from_target(target, input, self.num_classes, self.ignore_index)
        if self.ignore_index is None:
            return input, labels, labels.long(), None
        valid = labels != self.ignore_index
        index = torch.where(valid, labels, torch.zeros_like(labels)).long()
        return input, labels, index, valid

    def _cross_entropy(
        self, input: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None, **kw
    ) -> torch.Tensor:
        """Weighted CE with torch's conventions (mean = sum w_i CE_i / sum w_i over valid voxels).

        torch's mean is 0/0 = NaN when that denominator is 0 (no valid voxel, or only zero-weight classes); here
        the sum is divided by the denominator where it is positive and the term is 0 otherwise (zero gradient).
        """
        target = index[:, 0] if valid is None else torch.where(valid[:, 0], index[:, 0], -100)
        w = None if self.class_weight is None else self.class_weight.to(input.device, input.dtype)
        total = F.cross_entropy(input, target, weight=w, ignore_index=-100, reduction="sum", **kw)
        if self.reduction == "sum":
            return total
        if w is None:
            denom = total.new_tensor(float(target.numel())) if valid is None else valid.sum().to(total.dtype)
        else:
            denom = w[index] if valid is None else w[index] * valid
            denom = denom.sum()
        positive = denom > 0
        return torch.where(positive, total / torch.where(positive, denom, 1.0), 0.0)

    def _reduce_voxels(self, per_voxel: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Mean (or sum) of a ``B,1,*spatial`` map over valid voxels."""
        if valid is not None:
            per_voxel = per_voxel * valid
            n = valid.sum().clamp_min(1)
        else:
            n = per_voxel.numel()
        total = per_voxel.sum()
        return total / n if self.reduction == "mean" else total

    def _checked(self, loss: torch.Tensor, input: torch.Tensor, **others: object) -> torch.Tensor:
        """``loss`` if finite; else the error naming the non-finite argument (logits, prior, weight...)."""
        if not bool(torch.isfinite(loss)):
            raise non_finite_error(type(self).__name__, input, weight=self.class_weight, **others)
        return loss


class CrossEntropyLoss(_SegmentationLoss):
    """Plain cross-entropy with MONAI label conventions and ``ignore_index``.

    Example:
        >>> CrossEntropyLoss(3)(torch.randn(1, 3, 4, 4, 4), torch.randint(0, 3, (1, 1, 4, 4, 4))).ndim
        0
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, _, index, valid = self._prepare(input, target)
        return self._checked(self._cross_entropy(input, index, valid), input)


class LabelSmoothingLoss(_SegmentationLoss):
    """Cross-entropy against ``(1 - epsilon) * onehot + epsilon / C`` (Szegedy et al. 2016).

    Args:
        num_classes: number of classes.
        epsilon: smoothing factor in ``[0, 1)``.
        ignore_index, weight, reduction: as :class:`CrossEntropyLoss`.
    """

    def __init__(
        self, num_classes: int, epsilon: float = 0.1, ignore_index: int | None = None, weight=None, reduction="mean"
    ):
        super().__init__(num_classes, ignore_index, weight, reduction)
        self.epsilon = check_number(epsilon, "epsilon", minimum=0.0, maximum=1.0, exclusive_maximum=True)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, _, index, valid = self._prepare(input, target)
        return self._checked(self._cross_entropy(input, index, valid, label_smoothing=self.epsilon), input)


class DiceCELoss(_SegmentationLoss):
    """MONAI's soft Dice (all classes, softmax) plus cross-entropy, with ``ignore_index``.

    ``loss = lambda_dice * Dice + lambda_ce * CE``; MONAI's own ``DiceCELoss`` has no ignore index.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = None,
        weight=None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, ignore_index, weight, reduction)
        self.lambda_dice = check_number(lambda_dice, "lambda_dice", minimum=0.0)
        self.lambda_ce = check_number(lambda_ce, "lambda_ce", minimum=0.0)
        self.dice = DiceLoss(
            to_onehot_y=True, softmax=True, soft_label=True, ignore_index=self.ignore_index, reduction=reduction
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, labels, index, valid = self._prepare(input, target)
        ce = self._cross_entropy(input, index, valid)
        return self._checked(self.lambda_dice * self.dice(input, labels) + self.lambda_ce * ce, input)


class FocalLoss(_SegmentationLoss):
    """MONAI's softmax focal loss (Lin et al. 2017) with label conventions of this package.

    The per-voxel, per-class values are MONAI's (``monai.losses.FocalLoss(use_softmax=True)``, class weights
    included); the reduction is done here: ``"mean"`` over classes and valid voxels (as MONAI's mean without an
    ignore index), ``"sum"`` over classes and valid voxels. (MONAI 1.6.1 with ``ignore_index`` set divides by the
    voxel count only, i.e. returns ``C`` times its value without it, and its ``"sum"`` sums per-image means.)

    Args:
        num_classes: number of classes.
        gamma: focusing parameter (finite, >= 0).
        ignore_index, weight, reduction: as :class:`CrossEntropyLoss` (``weight`` scales each class channel).
    """

    def __init__(
        self, num_classes: int, gamma: float = 3.0, ignore_index: int | None = None, weight=None, reduction="mean"
    ):
        super().__init__(num_classes, ignore_index, weight, reduction)
        self.gamma = check_number(gamma, "gamma", minimum=0.0)
        self.focal = _MonaiFocalLoss(
            to_onehot_y=True,
            use_softmax=True,
            gamma=self.gamma,
            weight=None if self.class_weight is None else self.class_weight.tolist(),
            ignore_index=self.ignore_index,
            reduction="none",
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, labels, _, valid = self._prepare(input, target)
        per_voxel = self.focal(input, labels).sum(1, keepdim=True)  # B,1,*spatial; 0 at ignored voxels
        loss = self._reduce_voxels(per_voxel, valid)
        if self.reduction == "mean":
            loss = loss / self.num_classes
        return self._checked(loss, input)


class ECPLoss(_SegmentationLoss):
    """Confidence penalty (Pereyra et al. 2017): ``CE - beta * mean_i H(softmax(x_i))``."""

    def __init__(
        self, num_classes: int, beta: float = 0.1, ignore_index: int | None = None, weight=None, reduction="mean"
    ):
        super().__init__(num_classes, ignore_index, weight, reduction)
        self.beta = check_number(beta, "beta", minimum=0.0)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, _, index, valid = self._prepare(input, target)
        logp = F.log_softmax(input, dim=1)
        entropy = -(logp.exp() * logp).sum(1, keepdim=True)
        loss = self._cross_entropy(input, index, valid) - self.beta * self._reduce_voxels(entropy, valid)
        return self._checked(loss, input)


class MbLSLoss(_SegmentationLoss):
    """Margin-based label smoothing (Liu et al., CVPR 2022).

    ``CE + lambda * mean_{i,k} relu(max_j x_ij - x_ik - margin)``: logit distances above the margin are
    penalised. The mean runs over classes and valid voxels, as in the authors' code.
    """

    def __init__(
        self,
        num_classes: int,
        margin: float = 10.0,
        lambda_margin: float = 0.1,
        ignore_index: int | None = None,
        weight=None,
        reduction="mean",
    ) -> None:
        super().__init__(num_classes, ignore_index, weight, reduction)
        self.margin = check_number(margin, "margin", minimum=0.0)
        self.lambda_margin = check_number(lambda_margin, "lambda_margin", minimum=0.0)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, _, index, valid = self._prepare(input, target)
        gap = F.relu(input.amax(1, keepdim=True) - input - self.margin)
        penalty = self._reduce_voxels(gap.sum(1, keepdim=True), valid)
        if self.reduction == "mean":
            penalty = penalty / self.num_classes
        return self._checked(self._cross_entropy(input, index, valid) + self.lambda_margin * penalty, input)


class SVLSLoss(_SegmentationLoss):
    """Spatially varying label smoothing (Islam & Glocker, IPMI 2021): CE against the SVLS-smoothed one-hot.

    ``loss = mean_i -sum_c tau_ic log softmax(x_i)_c`` with τ from :func:`monai_nacl.neighbor_prior.neighbor_prior`
    (``kernel="gaussian"``: Gaussian weights, centre weight 0.5; replicate borders), computed in 3D or 2D.

    Args:
        num_classes: number of classes.
        kernel_size: odd window size (one or per axis).
        sigma: Gaussian sigma in voxels.
        ignore_index, reduction: as the other losses; ``weight`` is not supported for soft targets.
    """

    def __init__(
        self,
        num_classes: int,
        kernel_size: int | Sequence[int] = 3,
        sigma: float | Sequence[float] = 1.0,
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(num_classes, ignore_index, None, reduction)
        self.kernel_size, self.sigma = check_kernel_size(kernel_size), check_sigma(sigma)

    def forward(self, input: torch.Tensor, target: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: logits ``B,C,*spatial`` (2D or 3D).
            target: labels ``B,1,*spatial`` / ``B,*spatial`` or a hard one-hot ``B,C,*spatial``.
            prior: optional precomputed SVLS prior ``B,C,*spatial`` with values in ``[0, 1]``.

        Raises:
            ValueError: as the other losses; a prior of the wrong shape, with NaN/Inf or values outside ``[0, 1]``;
                a ``kernel_size`` or ``sigma`` with a different number of entries than the input's spatial dims.
        """
        input, labels, _, valid = self._prepare(input, target)
        if prior is None:
            dims = input.ndim - 2
            sizes, sigma = ensure_kernel_size(self.kernel_size, dims), ensure_sigma(self.sigma, dims)
            prior = neighbor_prior(labels, self.num_classes, "gaussian", sizes, sigma, "replicate", self.ignore_index)
        else:
            prior = check_prior(prior, input)
        soft_ce = -(prior.to(input) * F.log_softmax(input, dim=1)).sum(1, keepdim=True)
        return self._checked(self._reduce_voxels(soft_ce, valid), input, prior=prior)
