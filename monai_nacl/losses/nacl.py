"""Neighbor-Aware CaLibration (NACL) loss."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
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
from monai_nacl.losses.fused import fused_ce_penalty
from monai_nacl.neighbor_prior import KERNELS, PADDINGS, check_sigma, ensure_kernel_size, ensure_sigma, neighbor_prior

__all__ = ["NACLLoss", "check_penalty_weight"]


def check_penalty_weight(value: object, num_classes: int, name: str = "penalty_weight") -> torch.Tensor:
    """Per-class penalty weights as a float64 CPU tensor of ``num_classes`` finite values >= 0 (all zero allowed).

    Args:
        value: a sequence, NumPy array or tensor of numbers.
        num_classes: the required count.
        name: the argument name used in the error message.

    Returns:
        the weights, float64, on the CPU (a copy: later changes to ``value`` do not reach the loss).

    Raises:
        ValueError: a string or other non-numeric value, a count other than ``num_classes``, NaN/Inf, or a negative
            value; the message names ``name`` and shows the values.

    Example:
        >>> check_penalty_weight([0.1, 0.0, 0.3], 3).tolist()
        [0.1, 0.0, 0.3]
    """
    message = f"{name} must be a sequence of {num_classes} real numbers, got {value!r} ({type(value).__name__})."
    if isinstance(value, (str, bytes)):
        raise ValueError(message)
    try:
        raw = torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(message) from e
    if raw.dtype == torch.bool or raw.is_complex():
        raise ValueError(message)
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raw = torch.as_tensor(value, dtype=torch.float64)  # Python floats are doubles: keep them exact
    w = raw.to("cpu", torch.float64).flatten().clone()
    if w.numel() != num_classes:
        raise ValueError(f"{name} must hold {num_classes} values (one per class), got {w.numel()}: {w.tolist()}.")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} must hold {num_classes} finite values >= 0, got {w.tolist()}.")
    return w


class NACLLoss(_Loss):
    """Cross-entropy (optionally + Dice) plus a penalty pulling logits towards the neighbour prior τ.

    .. math::

        L = \\text{base}(x, y) + \\frac{1}{N C} \\sum_{i \\in \\text{valid}} \\sum_c \\lambda_c d(\\tau_{ic}, z_{ic})

    with ``z = x`` (logits, default) or ``softmax(x)``, ``d = |.|`` (``"l1"``) or ``(.)^2`` (``"l2"``), and τ
    the soft class proportions of the ground truth around each voxel (see :func:`monai_nacl.neighbor_prior.neighbor_prior`).
    ``λ_c = alpha`` for every class unless per-class weights are set (``penalty_weight``, class-adaptive NACL:
    e.g. updated during training by :class:`monai_nacl.handlers.ClassAdaptivePenalty`).
    Murugesan et al., "Neighbor-Aware Calibration of Segmentation Networks with Penalty-Based Constraints",
    Medical Image Analysis, https://arxiv.org/abs/2401.14487.

    Differences from ``monai.losses.NACLLoss`` (which equals ``padding="zeros", kernel="mean", base="ce"`` here):
    labels ``B,1,*spatial`` accepted; borders replicate by default so τ sums to 1 everywhere; ``"gaussian"``
    is the paper's SVLS kernel over ``kernel_size``; a precomputed ``prior`` skips all prior work; ignore
    index, class weights and a Dice+CE base; the CE and penalty gradients are fused into one pass.

    Args:
        num_classes: number of classes ``C`` (channels of ``input``).
        spatial_dims: 2 or 3.
        kernel: ``"mean"`` (box) or ``"gaussian"`` (SVLS kernel: Gaussian over the window, centre weight 0.5).
        kernel_size: odd window size, one for all axes or one per axis.
        sigma: Gaussian sigma in voxels, used by ``kernel="gaussian"``.
        distance: ``"l1"`` or ``"l2"``.
        penalty_on: ``"logits"`` (paper) or ``"softmax"``.
        alpha: penalty weight λ of every class (a finite real number >= 0; ints, floats, NumPy scalars); not used
            while ``penalty_weight`` is set.
        penalty_weight: optional per-class penalty weights ``λ_c`` (``C`` finite values >= 0, zeros allowed) that
            replace ``alpha``; ``[alpha] * C`` gives the scalar loss. Settable at any time (``loss.penalty_weight =
            [...]``, validated; ``None`` returns to ``alpha``); kept as a float64 buffer that follows the module's
            device, so a handler can change it during training without touching the optimizer.
        padding: ``"replicate"``, ``"zeros"`` (as MONAI) or ``"background"`` (as the authors' 2D code).
        ignore_index: label excluded from both terms and from every neighbourhood.
        weight: per-class weights of the CE term (length ``C``).
        base: ``"ce"`` (paper) or ``"dice_ce"`` (adds MONAI's soft-label Dice over all classes).
        reduction: ``"mean"`` (over valid voxels; the penalty also over classes), ``"sum"``, or ``"none"``
            (per-voxel map ``B,1,*spatial`` of ``CE + alpha * mean_c d``; only with ``base="ce"``).
        lambda_dice: weight of the Dice term for ``base="dice_ce"``.

    Raises:
        ValueError: invalid option values here, each naming the option, the value and (for a wrong type) its type:
            unknown strings, ``kernel_size`` not odd positive integers (``3.0`` and ``True`` included), ``alpha``,
            ``sigma`` or ``lambda_dice`` not finite real numbers (or negative), ``ignore_index`` not an integer,
            ``weight`` not ``C`` finite non-negative values with one > 0, ``penalty_weight`` not ``C`` finite
            non-negative values. In ``forward``: see :meth:`forward`.

    Example:
        >>> loss_fn = NACLLoss(num_classes=3)
        >>> logits = torch.randn(2, 3, 16, 16, 16, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 1, 16, 16, 16))
        >>> loss = loss_fn(logits, labels)
        >>> loss.backward()
        >>> sorted(loss_fn.last_components)
        ['base', 'ce', 'penalty']
        >>> loss_fn.penalty_weight = [0.05, 0.2, 0.2]  # class-adaptive: a weaker pull on the background
        >>> loss_fn.penalty_weight.tolist()
        [0.05, 0.2, 0.2]
    """

    def __init__(
        self,
        num_classes: int,
        spatial_dims: int = 3,
        kernel: str = "mean",
        kernel_size: int | Sequence[int] = 3,
        sigma: float | Sequence[float] = 1.0,
        distance: str = "l1",
        penalty_on: str = "logits",
        alpha: float = 0.1,
        padding: str = "replicate",
        ignore_index: int | None = None,
        weight: Sequence[float] | torch.Tensor | None = None,
        base: str = "ce",
        reduction: str = "mean",
        lambda_dice: float = 1.0,
        penalty_weight: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__(reduction=reduction)
        num_classes = check_num_classes(num_classes)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}.")
        if distance not in ("l1", "l2"):
            raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}.")
        if penalty_on not in ("logits", "softmax"):
            raise ValueError(f"penalty_on must be 'logits' or 'softmax', got {penalty_on!r}.")
        if base not in ("ce", "dice_ce"):
            raise ValueError(f"base must be 'ce' or 'dice_ce', got {base!r}.")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        if reduction == "none" and base != "ce":
            raise ValueError("reduction='none' gives a per-voxel map and needs base='ce' (Dice is not per voxel).")
        self.num_classes = int(num_classes)
        self.spatial_dims = spatial_dims
        self.kernel = kernel
        self.kernel_size = ensure_kernel_size(kernel_size, spatial_dims)
        self.sigma = ensure_sigma(check_sigma(sigma), spatial_dims)
        self.distance = distance
        self.penalty_on = penalty_on
        self.alpha = check_number(alpha, "alpha", minimum=0.0)
        self.padding = padding
        self.ignore_index = check_ignore_index(ignore_index)
        self.base = base
        self.lambda_dice = check_number(lambda_dice, "lambda_dice", minimum=0.0)
        self.register_buffer("class_weight", check_class_weight(weight, self.num_classes))
        self.register_buffer("_penalty_weight", None)
        self.penalty_weight = penalty_weight
        self.dice = (
            DiceLoss(
                include_background=True,
                to_onehot_y=True,
                softmax=True,
                soft_label=True,
                ignore_index=self.ignore_index,
                reduction=reduction,
            )
            if base == "dice_ce"
            else None
        )
        self.last_components: dict[str, torch.Tensor] = {}
        self._next_prior: torch.Tensor | None = None

    @property
    def penalty_weight(self) -> torch.Tensor | None:
        """Per-class penalty weights ``λ_c`` (float64, ``C`` values), or ``None`` when ``alpha`` weighs every class."""
        return self._penalty_weight

    @penalty_weight.setter
    def penalty_weight(self, value: Sequence[float] | torch.Tensor | None) -> None:
        """Validate and set the per-class penalty weights (``None``: back to the scalar ``alpha``).

        Raises:
            ValueError: not ``num_classes`` finite, non-negative numbers (the message names ``penalty_weight``).
        """
        if value is None:
            self._penalty_weight = None
            return
        self._penalty_weight = check_penalty_weight(value, self.num_classes).to(self._buffer_device())

    def _buffer_device(self) -> torch.device:
        """The device of this module's buffers (CPU until the module is moved, or when it has none)."""
        for buffer in self.buffers():
            return buffer.device
        return torch.device("cpu")

    def use_prior_once(self, prior: torch.Tensor) -> None:
        """Make the next ``forward`` call use this prior, then forget it.

        The next call takes it whatever happens: it is cleared when that call starts, so a call that raises
        (bad labels, a mismatched prior...) or that passes its own ``prior`` (which wins) does not leave it for a
        later batch. For training engines that call ``loss(pred, label)`` only, e.g. MONAI's ``SupervisedTrainer``:
        see :class:`monai_nacl.handlers.PriorFromBatch`.

        Raises:
            ValueError: ``prior`` is not a tensor.
        """
        if not isinstance(prior, torch.Tensor):
            raise ValueError(f"prior must be a torch.Tensor, got {type(prior).__name__}.")
        self._next_prior = prior

    def prior(self, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """τ for labels ``B,1,*spatial`` with this loss's kernel, padding and ignore index."""
        return neighbor_prior(
            labels, self.num_classes, self.kernel, self.kernel_size, self.sigma, self.padding, self.ignore_index, dtype
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: logits ``B,C,*spatial``.
            target: labels ``B,1,*spatial`` or ``B,*spatial``, or one-hot ``B,C,*spatial``.
            prior: optional precomputed τ ``B,C,*spatial`` (e.g. from :class:`monai_nacl.transforms.NeighborPriord`);
                when given, no prior is computed.

        Returns:
            the loss (a scalar unless ``reduction="none"``). ``self.last_components`` holds the detached
            ``base``, ``ce``, ``penalty`` (unweighted) and, for ``base="dice_ce"``, ``dice`` of this call.

        Raises:
            ValueError: wrong channel count or spatial dims; target/prior shape mismatch; label values that are not
                whole numbers or are outside ``[0, C)`` other than ``ignore_index``; a one-hot target that is not a
                hard one-hot; a prior with NaN/Inf or values outside ``[0, 1]``; a non-finite loss, naming the
                argument responsible (logits, ``alpha``, ``weight``).

        A batch in which no voxel counts (every voxel is ``ignore_index``) gives a loss of 0 with a zero gradient.
        """
        pending, self._next_prior = self._next_prior, None  # one call only, even if this call raises
        if prior is None:
            prior = pending
        input = as_tensor(input)
        check_logits(input, self.num_classes, self.spatial_dims)
        labels = labels_from_target(target, input, self.num_classes, self.ignore_index)
        tau = self.prior(labels) if prior is None else check_prior(prior, input)
        tau = tau.to(input.device)

        valid = None
        if self.ignore_index is not None:
            is_valid = labels != self.ignore_index
            valid = is_valid.to(torch.float32)
            index = torch.where(is_valid, labels, torch.zeros_like(labels)).long()
        else:
            index = labels.long()

        if self.reduction == "none":
            return self._forward_map(input, index, tau, valid)

        n_valid = float(valid.sum()) if valid is not None else float(index.numel())
        mean = self.reduction == "mean"
        if self.class_weight is not None:
            ce_weight: torch.Tensor | float = self.class_weight.to(input.device)[index]
            if valid is not None:
                ce_weight = ce_weight * valid
            if mean:
                ce_weight = ce_weight / ce_weight.sum().clamp_min(1e-12)
        elif valid is not None:
            ce_weight = valid / max(n_valid, 1.0) if mean else valid
        else:
            ce_weight = 1.0 / n_valid if mean else 1.0
        pen_scale = 1.0 / max(n_valid * self.num_classes, 1.0) if mean else 1.0

        total, ce, penalty = fused_ce_penalty(
            input,
            index,
            tau,
            ce_weight,
            valid,
            pen_scale,
            self._alphas(input),
            self.distance,
            self.penalty_on == "softmax",
        )
        base = ce
        components = {"ce": ce}
        if self.dice is not None:
            dice = self.dice(input, labels)
            total = total + self.lambda_dice * dice
            components["dice"] = dice.detach()
            base = ce + self.lambda_dice * components["dice"]
        if not bool(torch.isfinite(total)):  # the only host sync of the happy path
            raise self._non_finite(input, tau)
        components["base"] = base
        components["penalty"] = penalty
        self.last_components = components
        return total

    def _forward_map(
        self, input: torch.Tensor, index: torch.Tensor, tau: torch.Tensor, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-voxel loss map ``B,1,*spatial`` through plain autograd (not the hot path)."""
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()
        logp = F.log_softmax(x, dim=1)
        ce = -logp.gather(1, index)
        if self.class_weight is not None:
            ce = ce * self.class_weight.to(input.device)[index]
        z = logp.exp() if self.penalty_on == "softmax" else x
        diff = z - tau.to(x.dtype)
        d = diff.abs() if self.distance == "l1" else diff.square()
        pen = d.mean(1, keepdim=True)
        lam = self._alphas(x)
        if isinstance(lam, torch.Tensor):
            out = ce + (d * lam.to(x.dtype).view(1, -1, *([1] * (d.ndim - 2)))).mean(1, keepdim=True)
        else:
            out = ce + lam * pen
        if valid is not None:
            out = out * valid
        if not bool(torch.isfinite(out).all()):
            raise self._non_finite(input, tau)
        self.last_components = {"ce": ce.detach(), "base": ce.detach(), "penalty": pen.detach()}
        return out

    def _alphas(self, input: torch.Tensor) -> float | torch.Tensor:
        """``alpha`` (a float), or the per-class weights on ``input``'s device when they are set."""
        if self._penalty_weight is None:
            return self.alpha
        return self._penalty_weight.to(input.device, non_blocking=True)

    def _non_finite(self, input: torch.Tensor, tau: torch.Tensor) -> ValueError:
        """The error for a non-finite loss, naming the first non-finite argument (only on the error path)."""
        return non_finite_error(
            type(self).__name__,
            input,
            prior=tau,
            alpha=self.alpha if self._penalty_weight is None else None,
            penalty_weight=self._penalty_weight,
            weight=self.class_weight,
            lambda_dice=self.lambda_dice if self.dice is not None else None,
        )
