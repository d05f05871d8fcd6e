"""Cheap input checks shared by every public entry point.

Each check costs at most one reduction over a label-sized tensor, never a pass over the logits, so they can
stay on in training. Errors are ``ValueError`` messages that name the argument, the shapes and the values.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["as_tensor", "check_num_classes", "check_label_values", "labels_from_target", "check_logits"]


def as_tensor(x: torch.Tensor) -> torch.Tensor:
    """Drop a MONAI ``MetaTensor`` wrapper (keeping autograd history): metadata tracking is slow on hot paths."""
    as_plain = getattr(x, "as_tensor", None)
    return as_plain() if callable(as_plain) else x


def check_num_classes(num_classes: object) -> int:
    """``num_classes`` as an ``int``.

    Raises:
        ValueError: not a whole number >= 2 (``True``, ``"3"`` and ``2.5`` included).
    """
    whole = isinstance(num_classes, numbers.Integral) or (isinstance(num_classes, float) and num_classes.is_integer())
    if isinstance(num_classes, bool) or not whole or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    return int(num_classes)


def check_logits(input: torch.Tensor, num_classes: int, spatial_dims: int | None = None, name: str = "input") -> None:
    """Validate a ``B,C,*spatial`` floating tensor with ``C == num_classes``."""
    if not isinstance(input, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(input).__name__}.")
    if not input.is_floating_point():
        raise ValueError(f"{name} must be floating point (logits or probabilities), got dtype {input.dtype}.")
    if input.ndim not in (4, 5) and (spatial_dims is None or input.ndim != spatial_dims + 2):
        raise ValueError(f"{name} must have shape B,C,H,W[,D], got {tuple(input.shape)}.")
    if spatial_dims is not None and input.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} has {input.ndim - 2} spatial dims (shape {tuple(input.shape)}) but spatial_dims={spatial_dims}."
        )
    if input.shape[1] != num_classes:
        raise ValueError(f"{name} has {input.shape[1]} channels (shape {tuple(input.shape)}), expected {num_classes}.")


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int | None, name: str = "target") -> None:
    """Raise when a label is outside ``[0, num_classes)`` and is not ``ignore_index``."""
    if labels.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(labels.shape)}).")
    if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
        raise ValueError(f"{name} contains NaN or Inf.")
    lo, hi = torch.aminmax(labels)
    if lo >= 0 and hi < num_classes:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:8].tolist()
        where = tuple(torch.nonzero(bad)[0].tolist())
        allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"{name} has label values {values} outside {allowed} (first at index {where}).")


def labels_from_target(
    target: torch.Tensor, input: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Bring a target to integer-valued labels ``B,1,*spatial`` and validate it against ``input``.

    Accepts labels ``B,1,*spatial`` or ``B,*spatial`` (any numeric dtype), or a one-hot ``B,C,*spatial``
    (converted with ``argmax``; with ``ignore_index`` set, all-zero one-hot voxels become ``ignore_index``).

    Raises:
        ValueError: batch or spatial shape mismatch, or label values outside ``[0, C)`` other than ``ignore_index``.
    """
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}.")
    target = as_tensor(target)
    spatial = tuple(input.shape[2:])
    if target.ndim == input.ndim - 1:
        target = target.unsqueeze(1)
    if target.ndim != input.ndim or tuple(target.shape[2:]) != spatial or target.shape[0] != input.shape[0]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: expected "
            f"labels B,1,*spatial or B,*spatial, or one-hot B,C,*spatial with spatial shape {spatial}."
        )
    if target.shape[1] == 1:
        check_label_values(target, num_classes, ignore_index)
        return target
    if target.shape[1] != num_classes:
        raise ValueError(
            f"target has {target.shape[1]} channels (shape {tuple(target.shape)}): expected 1 (labels) or "
            f"{num_classes} (one-hot)."
        )
    labels = target.argmax(1, keepdim=True)
    if ignore_index is not None:
        labels = torch.where(target.amax(1, keepdim=True) > 0, labels, torch.full_like(labels, ignore_index))
    return labels
