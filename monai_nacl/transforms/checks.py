"""Input checks as transforms: fail on the case, naming its file, before a network turns it into silent NaN."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["EnsureFinited"]


class EnsureFinited(MapTransform):
    """Raise ``ValueError`` when an image holds NaN or infinite voxels (a network would return NaN probabilities
    and an all-background segmentation for it). The message names the key, the count and the source file.

    Args:
        keys: image keys to check.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            if x.is_floating_point() or x.is_complex():
                bad = int((~torch.isfinite(x)).sum())
                if bad:
                    source = d[key].meta.get("filename_or_obj", "") if isinstance(d[key], MetaTensor) else ""
                    raise ValueError(
                        f"{key}: {bad} of {x.numel()} voxels are NaN or infinite"
                        + (f" in {source}" if source else "")
                        + "; fix or mask them before inference."
                    )
        return d
