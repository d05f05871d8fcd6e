"""Cheap input checks shared by every public entry point.

Tensor checks are a few torch reductions (never a Python loop over voxels, no per-voxel ``.item()``): label checks
cost a pass or two over a label-sized tensor; probability and prior checks one ``aminmax`` (and, for
probabilities, one channel sum) over the tensor they check. Locating and listing offending values happens only
on the error path. Errors are ``ValueError`` messages that name the argument, the shapes and the offending values.
Option checks (:func:`check_number`, :func:`check_integer`, ...) run once, in constructors.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = [
    "as_tensor",
    "check_num_classes",
    "check_number",
    "check_integer",
    "check_number_sequence",
    "check_bool",
    "check_ignore_index",
    "check_class_weight",
    "check_logits",
    "check_label_values",
    "labels_from_target",
    "check_prior",
    "probability_tolerance",
    "probability_error",
    "check_probabilities",
    "non_finite_error",
]


def as_tensor(x: torch.Tensor) -> torch.Tensor:
    """Drop a MONAI ``MetaTensor`` wrapper (keeping autograd history): metadata tracking is slow on hot paths."""
    as_plain = getattr(x, "as_tensor", None)
    return as_plain() if callable(as_plain) else x


def _scalar(value: object) -> object:
    """A 0-d torch tensor or NumPy array as a Python scalar; anything else unchanged."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        return value.item()
    return value


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_num_classes(num_classes: object) -> int:
    """``num_classes`` as an ``int``.

    Raises:
        ValueError: not a whole number >= 2 (``True``, ``"3"`` and ``2.5`` included).
    """
    whole = isinstance(num_classes, numbers.Integral) or (isinstance(num_classes, float) and num_classes.is_integer())
    if isinstance(num_classes, bool) or not whole or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    return int(num_classes)


def check_number(
    value: object,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    allow_infinity: bool = False,
) -> float:
    """``value`` as a finite ``float``, for constructor options such as ``alpha``, ``sigma`` or ``epsilon``.

    Accepts Python, NumPy and 0-d torch ints and floats.

    Args:
        value: the option value.
        name: the option name used in the error message.
        minimum, maximum: optional bounds.
        exclusive_minimum, exclusive_maximum: whether the bounds themselves are excluded.
        allow_infinity: accept ``+inf`` (e.g. an upper bound meaning "none"); ``-inf`` and NaN stay refused.

    Returns:
        the value as a Python ``float``.

    Raises:
        ValueError: a ``bool``, string or other non-real value (the message names the value and its type), NaN or
            Inf (``+inf`` passes with ``allow_infinity``), or a value outside the bounds.
    """
    v = _scalar(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a real number (int or float), got {_describe(value)}.")
    v = float(v)
    if not math.isfinite(v) and not (allow_infinity and v == math.inf):
        raise ValueError(f"{name} must be finite, got {v}.")
    if minimum is not None and (v < minimum or (exclusive_minimum and v == minimum)):
        raise ValueError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum}, got {v}.")
    if maximum is not None and (v > maximum or (exclusive_maximum and v == maximum)):
        raise ValueError(f"{name} must be {'<' if exclusive_maximum else '<='} {maximum}, got {v}.")
    return v


def check_integer(
    value: object, name: str, minimum: int | None = None, maximum: int | None = None, whole_floats: bool = False
) -> int:
    """``value`` as an ``int``: Python, NumPy and 0-d torch integers; no ``bool``, and no float (not even ``3.0``)
    unless ``whole_floats`` (then ``1e6`` and ``48.0`` pass, for sizes that configs may write as floats).

    Raises:
        ValueError: not an integer (the message names the value and its type), or outside the bounds.
    """
    v = _scalar(value)
    whole = isinstance(v, numbers.Real) and math.isfinite(v) and float(v).is_integer()
    if isinstance(v, bool) or not (isinstance(v, numbers.Integral) or (whole_floats and whole)):
        raise ValueError(f"{name} must be an integer, got {_describe(value)}.")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(v)}.")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {int(v)}.")
    return int(v)


def check_number_sequence(values: object, name: str, minimum: float | None = None, exclusive_minimum: bool = False):
    """``values`` (a list, tuple, 1-d array or tensor) as a non-empty list of finite floats, each checked by
    :func:`check_number` with the bounds given (e.g. a voxel spacing: ``minimum=0, exclusive_minimum=True``).

    Raises:
        ValueError: not a non-empty sequence, or an entry that is not a finite number within the bounds.
    """
    if isinstance(values, (np.ndarray, torch.Tensor)) and values.ndim == 1:
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} must be a non-empty sequence of numbers, got {_describe(values)}.")
    return [check_number(v, f"{name}[{i}]", minimum, exclusive_minimum=exclusive_minimum) for i, v in enumerate(values)]


def check_bool(value: object, name: str) -> bool:
    """``value`` as a ``bool``: Python and NumPy booleans only (a config's ``"false"`` is truthy, so it is refused).

    Raises:
        ValueError: anything else (the message names the value and its type).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {_describe(value)}.")


def check_ignore_index(ignore_index: object) -> int | None:
    """``ignore_index`` as ``None`` or an ``int``.

    Raises:
        ValueError: anything else (e.g. the string ``"255"``, ``255.0`` or ``True``).
    """
    return None if ignore_index is None else check_integer(ignore_index, "ignore_index")


def check_class_weight(weight: object, num_classes: int, name: str = "weight") -> torch.Tensor | None:
    """Per-class weights as a float32 tensor of ``num_classes`` finite, non-negative values, not all zero.

    Raises:
        ValueError: not numbers, wrong count, NaN/Inf, a negative value, or all zero (nothing would count).
    """
    if weight is None:
        return None
    if isinstance(weight, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of {num_classes} numbers, got {_describe(weight)}.")
    try:
        w = torch.as_tensor(weight).detach().to(torch.float32).flatten().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a sequence of {num_classes} numbers, got {_describe(weight)}.") from e
    if w.numel() != num_classes or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool(w.any()):
        raise ValueError(f"{name} must hold {num_classes} finite non-negative values, not all zero, got {w.tolist()}.")
    return w


def check_logits(input: torch.Tensor, num_classes: int, spatial_dims: int | None = None, name: str = "input") -> None:
    """Validate a non-empty ``B,C,*spatial`` floating tensor with ``C == num_classes``.

    Raises:
        ValueError: not a tensor, not floating point, wrong number of dims, wrong channel count, or empty (batch
            size 0 or a spatial size 0).
    """
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
    if input.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(input.shape)}).")


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.nonzero(mask)[0].tolist())


def _examples(values: torch.Tensor, limit: int = 8) -> list:
    """Up to ``limit`` distinct values, floats shown to 6 significant digits (``1.9``, not ``1.899999976...``)."""
    out = torch.unique(values)[:limit].tolist()
    return [float(f"{v:.6g}") if isinstance(v, float) else v for v in out]


def check_label_values(
    labels: torch.Tensor, num_classes: int, ignore_index: int | None, name: str = "target"
) -> torch.Tensor:
    """Validate integer-valued class labels and return them ready for comparisons with ``ignore_index``.

    Labels may have any real dtype. Floating labels must hold whole numbers (``1.0`` is class 1; ``1.9`` is an
    error, never floored). Every value must be in ``[0, num_classes)`` or equal ``ignore_index``.

    Args:
        labels: the label tensor (any shape).
        num_classes: number of classes ``C``.
        ignore_index: label value that is allowed outside ``[0, C)``, or ``None``.
        name: argument name for messages.

    Returns:
        ``labels`` itself; ``bool`` labels as ``uint8``, and integer labels whose dtype cannot hold ``ignore_index``
        (e.g. ``uint8`` with ``-1``) as ``int64``, so that ``labels == ignore_index`` cannot wrap around.

    Raises:
        ValueError: empty, complex, NaN/Inf, non-integer values (the message lists them and the first index), or
            values outside ``[0, C)`` other than ``ignore_index``.
    """
    if labels.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(labels.shape)}).")
    if labels.is_complex():
        raise ValueError(f"{name} must hold real class labels, got dtype {labels.dtype}.")
    if labels.dtype == torch.bool:
        labels = labels.to(torch.uint8)
    if labels.is_floating_point():
        # One comparison catches fractional values and NaN (NaN != NaN); Inf is caught by the range check below.
        if not bool((labels == labels.trunc()).all()):
            finite = torch.isfinite(labels)
            if not bool(finite.all()):
                raise ValueError(f"{name} contains NaN or Inf (first at index {_first_index(~finite)}).")
            frac = labels != labels.trunc()
            raise ValueError(
                f"{name} must hold integer class labels, found non-integer values {_examples(labels[frac])} (first "
                f"at index {_first_index(frac)}); resample labels with nearest-neighbour interpolation or round them."
            )
    elif ignore_index is not None:
        info = torch.iinfo(labels.dtype)
        if not info.min <= ignore_index <= info.max:
            labels = labels.to(torch.int64)
    lo, hi = torch.aminmax(labels)
    if lo >= 0 and hi < num_classes:
        return labels
    if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
        raise ValueError(f"{name} contains NaN or Inf (first at index {_first_index(~torch.isfinite(labels))}).")
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bool(bad.any()):
        allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(
            f"{name} has label values {_examples(labels[bad])} outside {allowed} (first at index {_first_index(bad)})."
        )
    return labels


def _labels_from_onehot(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Class index ``B,1,*spatial`` of a hard one-hot ``B,C,*spatial``, after checking that it is one."""
    if target.is_complex():
        raise ValueError(f"target must be real, got dtype {target.dtype}.")
    binary = (target == 0) | (target == 1)
    if not bool(binary.all()):
        raise ValueError(
            f"one-hot target must hold 0/1 values, found {_examples(target[~binary])} (first at index "
            f"{_first_index(~binary)}); pass class labels B,1,*spatial or a hard one-hot (soft targets are not labels)."
        )
    count = target.sum(1, keepdim=True, dtype=torch.int32)
    if bool((count > 1).any()):
        raise ValueError(
            f"one-hot target has more than one class at a voxel (first at index {_first_index(count > 1)}): "
            "overlapping (multi-label) channels are not class labels."
        )
    labels = target.argmax(1, keepdim=True)
    empty = count == 0
    if ignore_index is None:
        if bool(empty.any()):
            raise ValueError(
                f"one-hot target has voxels with no class (all channels 0, first at index {_first_index(empty)}); "
                "set ignore_index to leave such voxels out."
            )
        return labels
    return torch.where(empty, torch.full_like(labels, ignore_index), labels)


def labels_from_target(
    target: torch.Tensor, input: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Bring a target to integer-valued labels ``B,1,*spatial`` and validate it against ``input``.

    Accepts labels ``B,1,*spatial`` or ``B,*spatial`` (any real dtype, whole-number values), or a hard one-hot
    ``B,C,*spatial`` (converted with ``argmax``; all-zero voxels become ``ignore_index`` when it is set).

    Args:
        target: the target tensor.
        input: the prediction it belongs to (``B,C,*spatial``); only its shape is read.
        num_classes: number of classes ``C``.
        ignore_index: label value to leave out, or ``None``.

    Returns:
        labels ``B,1,*spatial`` (see :func:`check_label_values` for the dtype).

    Raises:
        ValueError: not a tensor; batch or spatial shape mismatch; label values that are not whole numbers, NaN/Inf,
            or outside ``[0, C)`` other than ``ignore_index``; a one-hot that is not 0/1, has two classes at a voxel,
            or (without ``ignore_index``) a voxel with no class.
    """
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}.")
    target = as_tensor(target)
    if target.dtype == torch.bool:
        target = target.to(torch.uint8)
    spatial = tuple(input.shape[2:])
    if target.ndim == input.ndim - 1:
        target = target.unsqueeze(1)
    if target.ndim != input.ndim or tuple(target.shape[2:]) != spatial or target.shape[0] != input.shape[0]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: expected "
            f"labels B,1,*spatial or B,*spatial, or one-hot B,C,*spatial with spatial shape {spatial}."
        )
    if target.shape[1] == 1:
        return check_label_values(target, num_classes, ignore_index)
    if target.shape[1] != num_classes:
        raise ValueError(
            f"target has {target.shape[1]} channels (shape {tuple(target.shape)}): expected 1 (labels) or "
            f"{num_classes} (one-hot)."
        )
    if target.numel() == 0:
        raise ValueError(f"target is empty (shape {tuple(target.shape)}).")
    return _labels_from_onehot(target, ignore_index)


def check_prior(prior: object, input: torch.Tensor, name: str = "prior", full: bool = False) -> torch.Tensor:
    """Validate a neighbour prior τ against the logits it goes with; return it without a MetaTensor wrapper.

    τ must have the shape of ``input`` and hold class proportions in ``[0, 1]`` within :func:`probability_tolerance`
    (τ resampled by a bilinear ``RandAffined`` exceeds 1 by a few ulps; it need not sum to 1: zero padding and
    ignored neighbours give less). By default the range is checked on a strided sub-grid of at most 16 points
    per spatial axis (a view, no copy: a few kB read per image), which is what a wrong tensor passed as the prior
    (logits, an image, a label map) fails; the losses detect NaN/Inf anywhere in τ from their non-finite value and
    name the prior then (:func:`non_finite_error`), so the hot path never reads τ an extra time.

    Args:
        prior: τ ``B,C,*spatial``.
        input: the logits it goes with.
        name: argument name for messages.
        full: check every value (one ``aminmax`` over τ) instead of the sub-grid.

    Raises:
        ValueError: not a tensor, shape mismatch, complex, NaN/Inf or values outside ``[0, 1]`` in the checked values.
    """
    if not isinstance(prior, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(prior).__name__}.")
    prior = as_tensor(prior)
    if tuple(prior.shape) != tuple(input.shape):
        raise ValueError(
            f"{name} shape {tuple(prior.shape)} does not match input shape {tuple(input.shape)} (expected B,C,*spatial)."
        )
    if prior.is_complex():
        raise ValueError(f"{name} must be real, got dtype {prior.dtype}.")
    checked = prior if prior.dtype != torch.bool else prior.to(torch.uint8)
    if not full:
        checked = checked[(slice(None), slice(None), *(slice(None, None, max(1, n // 16)) for n in prior.shape[2:]))]
    lo, hi = torch.aminmax(checked)
    tol = probability_tolerance(prior.dtype) if prior.is_floating_point() else 0.0  # interpolated priors overshoot
    if not (lo >= -tol and hi <= 1 + tol):  # False for NaN too
        finite = torch.isfinite(prior)
        if not bool(finite.all()):
            raise ValueError(f"{name} contains NaN or Inf (first at index {_first_index(~finite)}).")
        lo, hi = torch.aminmax(prior)
        raise ValueError(
            f"{name} must hold class proportions in [0, 1] (τ from NeighborPrior or the loss's prior()), got values "
            f"in [{float(lo):.4g}, {float(hi):.4g}]."
        )
    return prior


def probability_tolerance(dtype: torch.dtype) -> float:
    """Default tolerance on channel sums of probabilities stored as ``dtype``: ``1e-3 + 4 eps``."""
    return 1e-3 + 4 * torch.finfo(dtype).eps


def probability_error(prob: torch.Tensor, dim: int = 1, name: str = "y_pred", atol: float | None = None) -> str | None:
    """Why ``prob`` is not a probability distribution over axis ``dim``, or ``None`` when it is one.

    Two reductions and one host sync: ``aminmax`` of the values and of the sums over ``dim``. Values must be
    finite and in ``[0, 1]``, and sums must be 1, both within ``atol`` (default :func:`probability_tolerance` of the
    dtype: about ``1e-3`` for float32, ``5e-3`` for float16, ``0.03`` for bfloat16), because interpolation
    (``grid_sample``, ``Invertd``) moves probabilities and their sums off ``[0, 1]`` and 1 by a few ulps.
    """
    x = prob if prob.is_floating_point() else prob.to(torch.float32)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    tol = probability_tolerance(x.dtype) if atol is None else float(atol)
    lo, hi = torch.aminmax(x)
    slo, shi = torch.aminmax(x.sum(dim, dtype=acc))
    lo, hi, slo, shi = torch.stack([lo.to(acc), hi.to(acc), slo, shi]).tolist()
    if not all(math.isfinite(v) for v in (lo, hi, slo, shi)):
        return f"{name} contains NaN or Inf."
    if lo < -tol or hi > 1 + tol:
        return (
            f"{name} must be probabilities (softmax over channels) in [0, 1]; got values in [{lo:.4g}, {hi:.4g}] "
            "(logits? apply softmax first)."
        )
    if slo < 1 - tol or shi > 1 + tol:
        return (
            f"{name} must be probabilities (softmax over channels); got channel sums in [{slo:.4g}, {shi:.4g}], "
            f"expected 1 within {tol:.2g} (sigmoid outputs, or probabilities over another axis?)."
        )
    return None


def check_probabilities(prob: torch.Tensor, dim: int = 1, name: str = "y_pred", atol: float | None = None) -> None:
    """Raise unless ``prob`` is a probability distribution over axis ``dim`` (see :func:`probability_error`).

    Raises:
        ValueError: NaN/Inf, values outside ``[0, 1]``, or sums over ``dim`` not 1 within ``atol``; the message
            gives the value or sum range found.
    """
    message = probability_error(prob, dim, name, atol)
    if message is not None:
        raise ValueError(message)


def non_finite_error(owner: str, input: torch.Tensor, **tensors: object) -> ValueError:
    """The error to raise when a loss value is not finite: it names the first non-finite argument.

    Called only after the loss came out non-finite, so the happy path pays nothing for it.

    Args:
        owner: the loss class name.
        input: the logits.
        tensors: other arguments or options that enter the loss (``prior``, ``alpha``, ``weight``...); ``None``
            values are skipped.

    Returns:
        the ``ValueError`` (to ``raise``).
    """
    for name, value in (("input", input), *tensors.items()):
        if value is None:
            continue
        t = torch.as_tensor(value)
        if not t.is_floating_point():
            continue
        finite = torch.isfinite(t.detach())
        if bool(finite.all()):
            continue
        if name == "input":
            return ValueError(
                f"{owner} got non-finite logits (NaN or Inf): input has {t[~finite][0].item()} at index "
                f"{_first_index(~finite)}."
            )
        if t.ndim == 0:
            return ValueError(f"{owner}: {name} is not finite ({t.item()}), so the loss is not finite.")
        return ValueError(
            f"{owner}: {name} contains NaN or Inf (first at index {_first_index(~finite)}), so the loss is not finite."
        )
    peak = float(input.detach().abs().amax())
    return ValueError(
        f"{owner}: the loss overflowed although its inputs are finite (largest |logit| {peak:.4g}, dtype {input.dtype})."
    )
