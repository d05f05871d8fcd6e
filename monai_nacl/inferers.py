"""Mirror test-time augmentation around any MONAI inferer, and the description of an inferer that calibration records
keep (the probabilities a temperature or a conformal threshold was fitted on depend on it)."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer

__all__ = ["MirrorInferer", "describe_inferer"]


class MirrorInferer(Inferer):
    """Average a network's logits over every combination of mirrored spatial axes (nnU-Net's test-time mirroring).

    Each of the ``2 ** len(spatial_axes)`` flipped copies of the input goes through ``inferer``, the output is
    flipped back and the logits are averaged. Logits, not probabilities, are averaged so the result is still a
    logit map: the bundles' postprocessing applies the softmax. With a ``TemperatureScaled`` network the
    temperature is applied inside every forward pass (per window and per mirroring; with two temperatures, each
    pass uses its own near/far split), so the result is the mean of the scaled logits. Temperatures and conformal
    records are fitted through the evaluator's inferer and record it (:func:`describe_inferer`): inference with
    another ``mirror_tta`` setting than calibration is reported as not calibrated.

    Args:
        inferer: the inferer to wrap, e.g. ``SlidingWindowInferer``; ``SimpleInferer`` when omitted.
        spatial_axes: spatial axes to mirror, counted from the first spatial dimension (0, 1, 2 for 3D).

    Raises:
        ValueError: ``spatial_axes`` empty, repeated, negative, not integers or beyond the input's spatial
            dimensions; ``inferer`` a class or not a MONAI ``Inferer``; an output that is not floating point or not of the
            input's spatial shape.

    Example::

        from monai.inferers import SlidingWindowInferer
        inferer = MirrorInferer(SlidingWindowInferer(roi_size=(40, 56, 40), mode="gaussian"))
        logits = inferer(image, network)  # the mean over 8 mirrorings
    """

    def __init__(self, inferer: Inferer | None = None, spatial_axes: Sequence[int] | int = (0, 1, 2)) -> None:
        super().__init__()
        given = spatial_axes.tolist() if isinstance(spatial_axes, (np.ndarray, torch.Tensor)) else spatial_axes
        given = (given,) if isinstance(given, numbers.Integral) else given
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
            raise ValueError(f"spatial_axes must be an axis or a sequence of axes, got {spatial_axes!r}")
        if not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in given):
            raise ValueError(f"spatial_axes must hold integers, got {list(given)!r}")
        axes = tuple(int(a) for a in given)
        if not axes or len(set(axes)) != len(axes) or min(axes) < 0:
            raise ValueError(f"spatial_axes must be distinct non-negative axes, got {axes}")
        if isinstance(inferer, type):
            raise ValueError(f"inferer must be an inferer object, got the class {inferer.__name__} (instantiate it)")
        if inferer is not None and not isinstance(inferer, Inferer):
            # calibration records describe the inner inferer, which needs its settings
            raise ValueError(f"inferer must be a MONAI Inferer object, got {type(inferer).__name__}")
        self.inferer = inferer
        self.spatial_axes = axes

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"MirrorInferer needs a batched tensor input (B, C, *spatial), got {type(inputs).__name__}")
        spatial_dims = inputs.ndim - 2
        if max(self.spatial_axes) >= spatial_dims:
            raise ValueError(
                f"spatial_axes {self.spatial_axes} do not fit an input with {spatial_dims} spatial dimensions "
                f"(shape {tuple(inputs.shape)})"
            )
        run = self.inferer if self.inferer is not None else (lambda x, net, *a, **k: net(x, *a, **k))
        total = None
        count = 0
        for n in range(len(self.spatial_axes) + 1):
            for subset in itertools.combinations(self.spatial_axes, n):
                dims = [a + 2 for a in subset]
                x = torch.flip(inputs, dims) if dims else inputs
                out = run(x, network, *args, **kwargs)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"MirrorInferer needs a tensor output, the network returned {type(out).__name__}")
                # flipping back aligns the output with the input only voxel for voxel, and averaging needs floats
                if out.shape[2:] != inputs.shape[2:] or not out.is_floating_point():
                    raise ValueError(
                        f"MirrorInferer needs floating-point outputs of the input's spatial shape "
                        f"{tuple(inputs.shape[2:])}, got {out.dtype} of shape {tuple(out.shape)}"
                    )
                out = torch.flip(out, dims) if dims else out
                # half-precision (AMP) outputs are summed in float32, float64 stays float64
                acc = out.to(torch.promote_types(out.dtype, torch.float32))
                total = acc if total is None else total + acc
                count += 1
        return (total / count).to(out.dtype)


def _plain(value: Any) -> Any:
    """Tuples, tensors and numpy values as JSON-friendly lists and numbers."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def describe_inferer(inferer: Any) -> str | None:
    """The settings of an inferer that change the probabilities it produces, as one canonical string
    (``"SlidingWindowInferer(roi_size=[40, 56, 40], overlap=[0.25, 0.25, 0.25], mode=constant, padding_mode=constant,
    cval=0)"``, ``"MirrorInferer(spatial_axes=[0, 1, 2], SimpleInferer())"``).

    Calibration records store it, so inference can tell that a temperature or a conformal threshold was fitted on
    other probabilities (mirror test-time augmentation on or off, another window, blending or padding). Settings
    that do not change the result are left out (batch sizes, devices, progress bars), and equivalent spellings give
    one string: a scalar ``roi_size``, ``overlap`` or ``sigma_scale`` is expanded to one value per axis (as many axes
    as any of them given per axis has, 3 when all are scalars), mirrored
    axes are sorted (the same flips are averaged), and ``SlidingWindowInferer`` subclasses that only choose the
    device (``SlidingWindowInfererAdapt``) are named as the base class.

    Args:
        inferer: a MONAI inferer, :class:`MirrorInferer`, a description string (returned unchanged) or ``None``.

    Returns:
        the description, or ``None`` for ``None``.

    Raises:
        ValueError: ``inferer`` is a class, or neither an ``Inferer`` nor a string.
    """
    from monai.inferers import SlidingWindowInferer, SlidingWindowInfererAdapt

    if inferer is None or isinstance(inferer, str):
        return inferer
    if isinstance(inferer, type) or not isinstance(inferer, Inferer):
        # any two plain functions would otherwise get one description and pass for the same inferer
        raise ValueError(f"describe_inferer takes a MONAI Inferer object or a description string, got {inferer!r}")
    if isinstance(inferer, MirrorInferer):
        inner = describe_inferer(inferer.inferer) if inferer.inferer is not None else "SimpleInferer()"
        return f"MirrorInferer(spatial_axes={sorted(_plain(inferer.spatial_axes))}, {inner})"
    name = type(inferer).__name__
    if not isinstance(inferer, SlidingWindowInferer):
        return f"{name}()"
    if type(inferer) is SlidingWindowInfererAdapt:
        name = "SlidingWindowInferer"
    roi, overlap, sigma = (_plain(v) for v in (inferer.roi_size, inferer.overlap, inferer.sigma_scale))
    mode = _option(inferer.mode)
    per_axis = [v for v in (roi, overlap, sigma if mode == "gaussian" else None) if isinstance(v, list)]
    dims = len(per_axis[0]) if per_axis else 3
    settings = {"roi_size": _per_axis(roi, dims), "overlap": _per_axis(overlap, dims), "mode": mode}
    if mode == "gaussian":
        settings["sigma_scale"] = _per_axis(sigma, dims)
    settings["padding_mode"] = _option(inferer.padding_mode)
    settings["cval"] = _plain(inferer.cval)
    if getattr(inferer, "with_coord", False):
        settings["with_coord"] = True
    return f"{name}({', '.join(f'{k}={v}' for k, v in settings.items())})"


def _per_axis(value: Any, dims: int) -> list:
    return value if isinstance(value, list) else [value] * dims


def _option(value: Any) -> str:
    """An enum option or its string, as its value (``BlendMode.GAUSSIAN`` and ``"gaussian"`` alike)."""
    return str(getattr(value, "value", value))
