"""Voxel-wise predictive entropy of a probability map."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from monai_nacl.input_checks import as_tensor, check_probabilities

__all__ = ["VoxelEntropy", "VoxelEntropyd"]


class VoxelEntropy(Transform):
    """``H = -sum_c p_c log p_c`` over the channel axis of probabilities ``C,*spatial`` → ``1,*spatial``.

    Args:
        normalize: divide by ``log C`` so that the entropy lies in ``[0, 1]``.

    Raises:
        ValueError: (when called) not ``C,*spatial`` with ``C >= 2`` and at most 3 spatial dims (a batch axis is
            an error), or not probabilities over the channel axis: NaN/Inf, values outside ``[0, 1]`` (logits) or
            channel sums not 1 (sigmoid outputs), checked with
            :func:`monai_nacl.input_checks.check_probabilities`.

    Example:
        >>> VoxelEntropy()(torch.full((2, 4, 4), 0.5)).max().item()
        1.0
    """

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize

    def __call__(self, prob: torch.Tensor) -> torch.Tensor:
        """
        Args:
            prob: probabilities ``C,*spatial`` (tensor, MetaTensor or array).

        Returns:
            the entropy ``1,*spatial`` (float32; a MetaTensor with ``prob``'s metadata when it is one).
        """
        plain = as_tensor(torch.as_tensor(prob))
        if plain.ndim < 2 or plain.ndim > 4 or plain.shape[0] < 2:
            raise ValueError(
                f"prob must be probabilities C,*spatial (at most 3 spatial dims, no batch axis) with C >= 2, got "
                f"{tuple(plain.shape)}."
            )
        check_probabilities(plain, dim=0, name="prob")  # tolerance of the input's own dtype
        p = plain.float()
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
