"""Voxel-wise predictive entropy of a probability map."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = ["VoxelEntropy", "VoxelEntropyd"]


class VoxelEntropy(Transform):
    """``H = -sum_c p_c log p_c`` over the channel axis of probabilities ``C,*spatial`` → ``1,*spatial``.

    Args:
        normalize: divide by ``log C`` so that the entropy lies in ``[0, 1]``.
    """

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize

    def __call__(self, prob: torch.Tensor) -> torch.Tensor:
        p = torch.as_tensor(prob).float()
        if p.ndim < 2 or p.shape[0] < 2:
            raise ValueError(f"probabilities must be C,*spatial with C >= 2, got {tuple(p.shape)}.")
        h = -(p * torch.log(p.clamp_min(1e-12))).sum(0, keepdim=True)
        if self.normalize:
            h = h / torch.log(torch.tensor(float(p.shape[0])))
        if isinstance(prob, MetaTensor):
            return MetaTensor(h, meta=prob.meta, applied_operations=list(prob.applied_operations))
        return h


class VoxelEntropyd(MapTransform):
    """Dictionary version of :class:`VoxelEntropy`: writes the entropy of ``keys`` to ``output_key``."""

    def __init__(self, keys: KeysCollection, output_key: str = "entropy", normalize: bool = True) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError("VoxelEntropyd takes exactly one probability key.")
        self.output_key, self.entropy = output_key, VoxelEntropy(normalize)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        d[self.output_key] = self.entropy(d[self.keys[0]])
        return d
