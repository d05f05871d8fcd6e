"""Resampling that tolerates the extra string entries MONAI Label puts in the data dictionary."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.transforms import Spacingd

__all__ = ["SafeSpacingd"]


class SafeSpacingd(Spacingd):
    """``monai.transforms.Spacingd`` that leaves non-dictionary ``<key>_*`` entries alone.

    MONAI 1.6.1's ``Spacingd`` takes every ``<key>_*`` entry of the data dictionary for a legacy meta dict and
    calls ``.update`` on it after resampling a NIfTI image; MONAI Label adds string entries such as
    ``image_path``, so the Model Zoo's bundles crash with ``'str' object has no attribute 'update'``. This
    subclass hides those entries during the call and puts them back unchanged; resampling, laziness and
    ``inverse`` (hence ``Invertd``) are the parent's.

    Args:
        same as ``monai.transforms.Spacingd``.

    Example:
        >>> t = SafeSpacingd("image", pixdim=(1.5, 1.5, 5.0))
        >>> out = t({"image": "case.nii.gz loaded as MetaTensor", "image_path": "case.nii.gz"})  # doctest: +SKIP
    """

    def __call__(self, data: Mapping[Hashable, object], lazy: bool | None = None) -> dict[Hashable, object]:
        d = dict(data)
        prefixes = tuple(f"{k}_" for k in self.keys)
        hidden = {
            k: d.pop(k) for k in list(d) if isinstance(k, str) and k.startswith(prefixes) and not isinstance(d[k], dict)
        }
        out = super().__call__(d, lazy=lazy)
        out.update(hidden)
        return out
