"""The neighbour prior computed on the training device from each patch's label, with a halo: nothing C-channel cached."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.engines.utils import PrepareBatch

from monai_nacl.input_checks import check_integer, check_label_values, check_number_sequence
from monai_nacl.neighbor_prior import (
    ensure_kernel_size,
    ensure_sigma,
    kernel_size_from_spacing,
    neighbor_prior,
    sigma_from_spacing,
)
from monai_nacl.transforms.prior import NeighborPrior

__all__ = ["PriorOnDevice", "LABEL_PAD_MODES"]

# how the label volume is padded by the halo before cropping, so that the patch's prior equals the prior of the
# whole volume computed with this padding (``"zeros"``, neighbours of no class, has no label value that does that)
LABEL_PAD_MODES = {"replicate": "edge", "background": "constant"}


class PriorOnDevice(PrepareBatch):
    """``prepare_batch`` for MONAI's ``SupervisedTrainer`` that computes τ on the device from the patch's label.

    The alternative to caching τ (:class:`~monai_nacl.transforms.NeighborPriord` before the random crop): the cache
    then holds only the image and the label, and τ costs one box filter of the patch on the GPU. To stay exact at
    patch edges, the training patches are cropped with a halo of ``kernel_size // 2`` voxels per side (the
    ``halo`` attribute): the volume is first padded by the halo (the label with :data:`LABEL_PAD_MODES`'s mode for
    ``padding``, e.g. ``BorderPadd(mode="edge")``), crops take ``patch_size + 2 * halo``, and this class computes τ
    of the enlarged label, then cuts the halo off τ, the image and the label. Each patch's τ is then exactly the
    crop of the whole volume's τ (same kernel, same padding at the volume's borders).

    Spatial augmentation between the crop and the device (``RandAffined``...) moves the label; τ is then the prior
    of the augmented label, so it matches the label the network is trained on (where τ warped by the augmentation
    would blur it, and rotated-in corners get the label's padding rather than no class). Label-driven crops
    (``RandCropByPosNegLabeld``) choose their centres in the padded volume, so a structure touching the volume's
    border adds a few centres in the halo: the crops' positions differ slightly from the cached pipeline's, their τ
    does not.

    τ is handed to the loss the way the cached one is: it is written to ``batchdata[prior_key]`` (the engine's
    ``state.batch``, which MONAI's ``SupervisedTrainer`` passes here), where
    :class:`~monai_nacl.handlers.PriorFromBatch` finds it after the forward pass.

    Args:
        num_classes: number of classes ``C``.
        kernel: ``"mean"`` or ``"gaussian"``.
        kernel_size: odd window size in voxels, one or per axis (ignored with ``neighborhood_mm``).
        sigma: Gaussian sigma (voxels; millimetres with ``neighborhood_mm``).
        padding: ``"replicate"`` or ``"background"`` (how the volume's border is extended; see above).
        ignore_index: label value that is not a neighbour.
        neighborhood_mm: the window's edge in mm, with ``spacing``: each axis gets the odd voxel count closest to
            it, as :class:`~monai_nacl.transforms.NeighborPrior` picks it from the label's spacing.
        spacing: voxel spacing in mm of the training volumes (the bundle's ``pixdim``), with ``neighborhood_mm``.
        patch_size: the spatial size the network is trained on; when given, a batch whose size after the halo is cut
            differs is refused (its crop was not enlarged by ``2 * halo``).
        image_key, label_key, prior_key: batch keys.
        dtype: dtype of τ.

    Raises:
        ValueError: bad options (named), ``padding="zeros"``, ``neighborhood_mm`` without ``spacing``, keys that are
            not three different strings; at run time a batch that is not a dict or lacks the keys, a label that is not ``B,1,*spatial`` or holds values outside ``[0, C)``, a patch
            no larger than ``2 * halo``, or one of the wrong size.

    Example (a bundle override; the crop takes ``train#crop_size``)::

        "train#prior_on_device": {"_target_": "monai_nacl.prepare_batch.PriorOnDevice", "num_classes": 3,
                                  "kernel_size": 3, "patch_size": "@patch_size"},
        "train#prior_transform": {"_target_": "BorderPadd", "keys": ["image", "label"],
                                  "spatial_border": "$@train#prior_on_device.halo", "mode": "edge"},
        "train#crop_size": "$@train#prior_on_device.crop_size",
        "train#trainer#prepare_batch": "@train#prior_on_device"

    Example:
        >>> prepare = PriorOnDevice(num_classes=2, kernel_size=3)
        >>> batch = {"image": torch.zeros(1, 1, 6, 6, 6), "label": torch.zeros(1, 1, 6, 6, 6)}
        >>> image, label = prepare(batch, torch.device("cpu"))
        >>> image.shape, batch["prior"].shape
        (torch.Size([1, 1, 4, 4, 4]), torch.Size([1, 2, 4, 4, 4]))
    """

    def __init__(
        self,
        num_classes: int,
        kernel: str = "mean",
        kernel_size: int | Sequence[int] = 3,
        sigma: float | Sequence[float] = 1.0,
        padding: str = "replicate",
        ignore_index: int | None = None,
        neighborhood_mm: float | Sequence[float] | None = None,
        spacing: Sequence[float] | None = None,
        patch_size: Sequence[int] | None = None,
        image_key: str = "image",
        label_key: str = "label",
        prior_key: str = "prior",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # the options mean what they mean for the cached prior, and are checked the same way
        cached = NeighborPrior(num_classes, kernel, kernel_size, sigma, padding, ignore_index, neighborhood_mm, dtype)
        if padding not in LABEL_PAD_MODES:
            raise ValueError(
                f"padding must be one of {tuple(LABEL_PAD_MODES)} for a prior computed on the device, got {padding!r} "
                "(no padded label reproduces 'zeros', neighbours of no class: cache τ with NeighborPriord instead)."
            )
        self.num_classes, self.kernel, self.padding = cached.num_classes, cached.kernel, cached.padding
        self.ignore_index, self.dtype = cached.ignore_index, cached.dtype
        self.kernel_size, self.sigma = cached.kernel_size, cached.sigma
        if cached.neighborhood_mm is not None:  # resolved once: the training volumes all have the bundle's spacing
            if spacing is None:
                raise ValueError(
                    "neighborhood_mm needs spacing (the training volumes' voxel size in mm, e.g. @pixdim)."
                )
            spacing = check_number_sequence(spacing, "spacing", minimum=0.0, exclusive_minimum=True)
            self.kernel_size = kernel_size_from_spacing(cached.neighborhood_mm, spacing)
            self.sigma = sigma_from_spacing(cached.sigma, spacing)
        self.patch_size = None if patch_size is None else tuple(_check_patch_size(patch_size))
        if self.patch_size is not None:
            per_axis = [v for v in (self.kernel_size, self.sigma) if isinstance(v, tuple)]
            if any(len(v) != len(self.patch_size) for v in per_axis):
                raise ValueError(
                    f"kernel_size {self.kernel_size} and sigma {self.sigma} must give one value per axis of patch_size "
                    f"{list(self.patch_size)} (or one for all)."
                )
        for key, name in ((image_key, "image_key"), (label_key, "label_key"), (prior_key, "prior_key")):
            if not isinstance(key, str):
                raise ValueError(f"{name} must be a string, got {key!r}.")
        if len({image_key, label_key, prior_key}) != 3:
            # each is written back into the batch: a shared key would feed the network its label, or the loss its image
            raise ValueError(
                f"image_key, label_key and prior_key must differ, got {image_key!r}, {label_key!r}, {prior_key!r}."
            )
        self.image_key, self.label_key, self.prior_key = image_key, label_key, prior_key

    def _sizes(self, spatial_dims: int) -> tuple[int, ...]:
        return ensure_kernel_size(self.kernel_size, spatial_dims)

    @property
    def halo(self) -> list[int]:
        """Voxels added on each side of every spatial axis (``kernel_size // 2``), for ``BorderPadd``.

        Raises:
            ValueError: one ``kernel_size`` for all axes and no ``patch_size`` to tell how many axes there are.
        """
        if isinstance(self.kernel_size, tuple):
            return [k // 2 for k in self.kernel_size]
        if self.patch_size is None:
            raise ValueError("halo needs patch_size (or a kernel_size per axis) to know the number of axes.")
        return [k // 2 for k in self._sizes(len(self.patch_size))]

    @property
    def crop_size(self) -> list[int]:
        """``patch_size + 2 * halo``: the size to crop training patches at (needs ``patch_size``)."""
        if self.patch_size is None:
            raise ValueError("crop_size needs patch_size.")
        return [p + 2 * h for p, h in zip(self.patch_size, self.halo)]

    @property
    def label_pad_mode(self) -> str:
        """The ``BorderPadd`` mode for the label that makes the patches' τ equal the volume's."""
        return LABEL_PAD_MODES[self.padding]

    def __call__(
        self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
    ):
        """
        Args:
            batchdata: the collated batch, ``image`` ``B,channels,*spatial`` and ``label`` ``B,1,*spatial`` of patches
                enlarged by the halo. ``batchdata[prior_key]`` receives τ ``B,C,*patch`` on ``device``, and the image
                and label keys the cut tensors.
            device, non_blocking, kwargs: as MONAI's ``PrepareBatch`` (``kwargs`` go to ``Tensor.to``).

        Returns:
            ``(image, label)`` on ``device`` with the halo cut off (also written back to ``batchdata``).
        """
        if not isinstance(batchdata, Mapping):
            raise ValueError(
                f"PriorOnDevice: the batch must be a dict of collated tensors (keys {self.image_key!r}, "
                f"{self.label_key!r}), got {type(batchdata).__name__}."
            )
        for key in (self.image_key, self.label_key):
            if key not in batchdata:
                raise ValueError(f"PriorOnDevice: the batch has no '{key}' (keys: {sorted(batchdata)}).")
        image = _plain(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        label = _plain(batchdata[self.label_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        if (
            label.ndim < 3
            or label.shape[1] != 1
            or image.shape[0] != label.shape[0]
            or image.shape[2:] != label.shape[2:]
        ):
            raise ValueError(
                f"PriorOnDevice: label must be B,1,*spatial with the image's B and spatial size, got image "
                f"{tuple(image.shape)} and label {tuple(label.shape)}."
            )
        spatial = tuple(label.shape[2:])
        sizes = self._sizes(len(spatial))
        halo = [k // 2 for k in sizes]
        if any(s <= 2 * h for s, h in zip(spatial, halo)):
            raise ValueError(f"PriorOnDevice: patch {spatial} is no larger than twice the halo {halo} on some axis.")
        inner = tuple(s - 2 * h for s, h in zip(spatial, halo))
        if self.patch_size is not None and inner != self.patch_size:
            raise ValueError(
                f"PriorOnDevice: patches of {spatial} leave {inner} once the halo {halo} is cut off, not the patch size "
                f"{self.patch_size}: crop training patches at patch_size + 2 * halo = {self.crop_size} "
                "(train#crop_size)."
            )
        check_label_values(label, self.num_classes, self.ignore_index, name=f"batch['{self.label_key}']")
        sigma = ensure_sigma(self.sigma, len(spatial))
        tau = neighbor_prior(
            label, self.num_classes, self.kernel, sizes, sigma, self.padding, self.ignore_index, self.dtype
        )
        window = (slice(None), slice(None), *(slice(h, s - h) for s, h in zip(spatial, halo)))
        # copies, not views: the haloed buffers are freed, and handlers reading the batch see what the loss sees
        image, label = image[window].contiguous(), label[window].contiguous()
        batchdata[self.prior_key] = tau[window].contiguous()
        batchdata[self.image_key], batchdata[self.label_key] = image, label
        return image, label


def _plain(value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"PriorOnDevice: expected collated tensors, got {type(value).__name__}.")
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def _check_patch_size(size: Sequence[int]) -> list[int]:
    """``patch_size`` as positive integers (a list, tuple, 1-d array or tensor of whole numbers)."""
    if isinstance(size, (np.ndarray, torch.Tensor)) and size.ndim == 1:
        size = size.tolist()
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or not size:
        raise ValueError(f"patch_size must be a sequence of positive integers, got {size!r}.")
    try:
        return [check_integer(s, "patch_size", minimum=1, whole_floats=True) for s in size]
    except ValueError:
        raise ValueError(f"patch_size must be a sequence of positive integers, got {list(size)}.") from None
