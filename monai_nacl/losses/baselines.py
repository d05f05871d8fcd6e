"""Calibration baselines with the same conventions as :class:`~monai_nacl.losses.NACLLoss`.

Every loss takes logits ``B,C,*spatial`` and labels ``B,1,*spatial`` / ``B,*spatial`` / one-hot, honours
``ignore_index`` (voxels excluded from every term) and averages over valid voxels, so benchmarks compare
like with like. Where MONAI has the loss (Dice, focal) it is used as is; the rest are a few tensor ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.losses import FocalLoss as _MonaiFocalLoss
from torch.nn.modules.loss import _Loss

from monai_nacl.prior import _ensure_sigma, ensure_kernel_size, neighbor_prior
from monai_nacl.validation import as_tensor, check_logits, check_num_classes, labels_from_target

__all__ = ["CrossEntropyLoss", "DiceCELoss", "LabelSmoothingLoss", "FocalLoss", "ECPLoss", "MbLSLoss", "SVLSLoss"]


class _SegmentationLoss(_Loss):
    """Shared target handling: validation, ignore mask and the mean over valid voxels."""

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
        self.ignore_index = ignore_index
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32).flatten()
            if weight.numel() != self.num_classes or bool((weight < 0).any()):
                raise ValueError(f"weight must hold {self.num_classes} non-negative values, got {weight.tolist()}.")
        self.register_buffer("class_weight", weight)

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
        """Weighted CE with torch's conventions (mean = sum w_i CE_i / sum w_i over valid voxels)."""
        target = index[:, 0] if valid is None else torch.where(valid[:, 0], index[:, 0], -100)
        w = None if self.class_weight is None else self.class_weight.to(input.device, input.dtype)
        return F.cross_entropy(input, target, weight=w, ignore_index=-100, reduction=self.reduction, **kw)

    def _reduce_voxels(self, per_voxel: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Mean (or sum) of a ``B,1,*spatial`` map over valid voxels."""
        if valid is not None:
            per_voxel = per_voxel * valid
            n = valid.sum().clamp_min(1)
        else:
            n = per_voxel.numel()
        total = per_voxel.sum()
        return total / n if self.reduction == "mean" else total

    def _checked(self, loss: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"{type(self).__name__} got non-finite logits (NaN or Inf): the loss is not finite.")
        return loss


class CrossEntropyLoss(_SegmentationLoss):
    """Plain cross-entropy with MONAI label conventions and ``ignore_index``.

    Example:
        >>> CrossEntropyLoss(3)(torch.randn(1, 3, 4, 4, 4), torch.randint(0, 3, (1, 1, 4, 4, 4))).ndim
        0
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, _, index, valid = self._prepare(input, target)
        return self._checked(self._cross_entropy(input, index, valid))


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
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}.")
        self.epsilon = float(epsilon)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, _, index, valid = self._prepare(input, target)
        return self._checked(self._cross_entropy(input, index, valid, label_smoothing=self.epsilon))


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
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.dice = DiceLoss(
            to_onehot_y=True, softmax=True, soft_label=True, ignore_index=ignore_index, reduction=reduction
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, labels, index, valid = self._prepare(input, target)
        ce = self._cross_entropy(input, index, valid)
        return self._checked(self.lambda_dice * self.dice(input, labels) + self.lambda_ce * ce)


class FocalLoss(_SegmentationLoss):
    """MONAI's softmax focal loss (Lin et al. 2017) with label conventions of this package.

    The mean runs over classes and voxels as in ``monai.losses.FocalLoss``.
    """

    def __init__(
        self, num_classes: int, gamma: float = 3.0, ignore_index: int | None = None, weight=None, reduction="mean"
    ):
        super().__init__(num_classes, ignore_index, None, reduction)
        self.gamma = float(gamma)
        self.focal = _MonaiFocalLoss(
            to_onehot_y=True,
            use_softmax=True,
            gamma=gamma,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, labels, _, _ = self._prepare(input, target)
        return self._checked(self.focal(input, labels))


class ECPLoss(_SegmentationLoss):
    """Confidence penalty (Pereyra et al. 2017): ``CE - beta * mean_i H(softmax(x_i))``."""

    def __init__(
        self, num_classes: int, beta: float = 0.1, ignore_index: int | None = None, weight=None, reduction="mean"
    ):
        super().__init__(num_classes, ignore_index, weight, reduction)
        self.beta = float(beta)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, _, index, valid = self._prepare(input, target)
        logp = F.log_softmax(input, dim=1)
        entropy = -(logp.exp() * logp).sum(1, keepdim=True)
        return self._checked(self._cross_entropy(input, index, valid) - self.beta * self._reduce_voxels(entropy, valid))


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
        self.margin, self.lambda_margin = float(margin), float(lambda_margin)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, _, index, valid = self._prepare(input, target)
        gap = F.relu(input.amax(1, keepdim=True) - input - self.margin)
        penalty = self._reduce_voxels(gap.sum(1, keepdim=True), valid)
        if self.reduction == "mean":
            penalty = penalty / self.num_classes
        return self._checked(self._cross_entropy(input, index, valid) + self.lambda_margin * penalty)


class SVLSLoss(_SegmentationLoss):
    """Spatially varying label smoothing (Islam & Glocker, IPMI 2021): CE against the SVLS-smoothed one-hot.

    ``loss = mean_i -sum_c tau_ic log softmax(x_i)_c`` with τ from :func:`monai_nacl.prior.neighbor_prior`
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
        self.kernel_size, self.sigma = kernel_size, sigma

    def forward(self, input: torch.Tensor, target: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        input, labels, _, valid = self._prepare(input, target)
        if prior is None:
            dims = input.ndim - 2
            sizes, sigma = ensure_kernel_size(self.kernel_size, dims), _ensure_sigma(self.sigma, dims)
            prior = neighbor_prior(labels, self.num_classes, "gaussian", sizes, sigma, "replicate", self.ignore_index)
        elif tuple(prior.shape) != tuple(input.shape):
            raise ValueError(f"prior shape {tuple(prior.shape)} does not match input shape {tuple(input.shape)}.")
        soft_ce = -(as_tensor(prior).to(input) * F.log_softmax(input, dim=1)).sum(1, keepdim=True)
        return self._checked(self._reduce_voxels(soft_ce, valid))
