"""ACE and MCE as MONAI's ``CalibrationErrorMetric`` reports them, with the settings of Barfoot et al.

Barfoot et al. ("Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation") evaluate
calibration with ``monai.metrics.CalibrationErrorMetric``: 20 equal-width bins, one-vs-rest per class and per
volume (``p_c`` against ``[y = c]``), background excluded, the per-bin gaps averaged (ACE) or maximised (MCE),
then the mean over classes and over volumes. :func:`monai_calibration_errors` runs MONAI's metric itself, so
numbers are comparable with papers that report it; it only adds input checks and the label conversion.
Every voxel counts (MONAI's metric has no mask). The package's own :class:`CalibrationMetric` ``ace`` and
``mce`` are top-label instead (and streamed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.metrics import CalibrationErrorMetric

from monai_nacl.input_checks import (
    as_tensor,
    check_integer,
    check_num_classes,
    check_probabilities,
    labels_from_target,
)

__all__ = ["monai_calibration_errors", "monai_calibration_output"]


def monai_calibration_errors(
    probs: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | Sequence[torch.Tensor],
    num_classes: int,
    num_bins: int = 20,
    include_background: bool = False,
) -> dict[str, float]:
    """MONAI's class-wise ACE (``calibration_reduction="average"``) and MCE (``"maximum"``), per volume, then the
    mean over volumes, with Barfoot et al.'s settings by default.

    For each volume and class ``c`` (from 1 unless ``include_background``), ``monai.metrics.CalibrationErrorMetric``
    bins ``p_c`` into ``num_bins`` equal-width bins and takes the mean (ACE) or the maximum (MCE) over non-empty
    bins of ``|mean p_c - fraction with y = c|``; the classes of a volume are averaged by MONAI
    (``metric_reduction="mean_channel"``), then the volumes here.

    Args:
        probs: probabilities ``B,C,*spatial`` (softmax over channels), or a sequence of ``C,*spatial`` volumes
            (sizes may differ).
        labels: labels ``B,1,*spatial`` / ``B,*spatial`` or a hard one-hot ``B,C,*spatial`` (or a sequence of
            per-volume ``1,*spatial`` / ``*spatial`` / ``C,*spatial`` tensors matching ``probs``).
        num_classes: number of classes ``C``.
        num_bins: equal-width bins (20 in Barfoot et al.).
        include_background: count class 0 too (``False`` in Barfoot et al.).

    Returns:
        ``{"ace": float, "mce": float, "n_volumes": int}``.

    Raises:
        ValueError: ``num_classes`` not an integer >= 2, ``num_bins`` not a positive integer; ``include_background``
            not a bool; ``probs`` that are not floating probabilities over
            ``num_classes`` channels; labels that do not match ``probs`` or lie outside ``[0, C)``; sequences of
            different lengths or empty.

    Example:
        >>> probs = torch.softmax(torch.randn(2, 3, 8, 8, 8), 1)
        >>> result = monai_calibration_errors(probs, torch.randint(0, 3, (2, 1, 8, 8, 8)), num_classes=3)
        >>> sorted(result)
        ['ace', 'mce', 'n_volumes']
    """
    num_classes = int(check_num_classes(num_classes))
    num_bins = check_integer(num_bins, "num_bins", minimum=1)
    if not isinstance(include_background, bool):
        raise ValueError(f"include_background must be a bool, got {include_background!r}.")
    if isinstance(probs, (list, tuple)):
        if not isinstance(labels, (list, tuple)) or len(labels) != len(probs):
            raise ValueError("probs and labels must both be tensors or sequences of the same length.")
        pairs = [(as_tensor(p)[None], as_tensor(t)[None]) for p, t in zip(probs, labels)]
    else:
        pairs = [(as_tensor(probs), as_tensor(labels))]
    if not pairs:
        raise ValueError("probs is an empty sequence: no volume to evaluate.")

    metrics = {
        key: CalibrationErrorMetric(
            num_bins=num_bins,
            include_background=include_background,
            calibration_reduction=reduction,
            metric_reduction="mean_channel",
        )
        for key, reduction in (("ace", "average"), ("mce", "maximum"))
    }
    for p, t in pairs:
        if not isinstance(p, torch.Tensor) or p.ndim < 3 or not p.is_floating_point():
            raise ValueError(f"probs must be floating probabilities B,C,*spatial, got {getattr(p, 'shape', type(p))}.")
        if p.shape[1] != num_classes:
            raise ValueError(f"probs has {p.shape[1]} channels (shape {tuple(p.shape)}), expected {num_classes}.")
        if p.numel() == 0:
            raise ValueError(f"probs is empty (shape {tuple(p.shape)}).")
        p = p.detach()
        check_probabilities(p, 1, name="probs")
        y = labels_from_target(as_tensor(t).to(p.device), p, num_classes).long()
        onehot = F.one_hot(y[:, 0], num_classes).movedim(-1, 1).to(p.dtype)
        for metric in metrics.values():
            metric(y_pred=p, y=onehot)
    out: dict[str, float] = {}
    for key, metric in metrics.items():
        per_volume = metric.aggregate()  # MONAI's "mean_channel": each volume's classes averaged
        valid = ~torch.isnan(per_volume)
        out[key] = float(per_volume[valid].mean()) if bool(valid.any()) else math.nan
    out["n_volumes"] = sum(int(p.shape[0]) for p, _ in pairs)
    return out


def monai_calibration_output(
    num_classes: int, prob_key: str = "prob", label_key: str = "label_index"
) -> Callable[[Sequence[Mapping]], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """An ``output_transform`` that feeds ``monai.handlers.CalibrationError`` from the bundles' evaluator output.

    MONAI's handler needs probabilities and one-hot labels per case; the bundles' validation postprocessing keeps
    the calibrated probabilities (``prob``) and the class-index label (``label_index``, before any region mapping
    such as BraTS's), so this one-hot encodes the latter.

    Args:
        num_classes: number of classes C.
        prob_key: key of the ``C,*spatial`` probabilities in each decollated case.
        label_key: key of the ``1,*spatial`` class-index label.

    Returns:
        ``f(batch) -> (probs, one_hot_labels)``, two lists with one ``C,*spatial`` tensor per case.

    Raises:
        ValueError: bad ``num_classes`` (at construction); at call time, a case whose label holds a value outside
            ``[0, C)`` or whose shapes differ.

    Example::

        handler = monai.handlers.CalibrationError(
            num_bins=20, include_background=False, calibration_reduction="average",
            output_transform=monai_calibration_output(3),
        )
    """
    num_classes = check_num_classes(num_classes)

    def transform(batch: Sequence[Mapping]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        probs, onehots = [], []
        for i, case in enumerate(batch):
            prob, label = as_tensor(case[prob_key]), as_tensor(case[label_key])
            index = label.long().reshape(label.shape[-prob.ndim + 1 :])
            if index.shape != prob.shape[1:] or prob.shape[0] != num_classes:
                raise ValueError(
                    f"case {i}: {prob_key} {tuple(prob.shape)} and {label_key} {tuple(label.shape)} do not match "
                    f"{num_classes} classes over one grid."
                )
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_classes):
                raise ValueError(f"case {i}: {label_key} holds values outside [0, {num_classes}).")
            probs.append(prob)
            onehots.append(F.one_hot(index, num_classes).movedim(-1, 0).to(prob.dtype))
        return probs, onehots

    return transform
