"""The two names MONAI Label imports from ``torchvision.utils``; neither is used by bundle inference or training.

They are called only by MONAI Label's 2D debug dump transform (``DumpImagePrediction2Dd``) and DeepEdit's
TensorBoard image handler; calling them here raises with the reason.
"""

from __future__ import annotations

_WHY = (
    "torchvision is not importable in this environment (monailabel_nacl's stand-in is in use); "
    "install a torchvision build that matches torch to use {}"
)


def make_grid(*args, **kwargs):
    raise RuntimeError(_WHY.format("make_grid"))


def save_image(*args, **kwargs):
    raise RuntimeError(_WHY.format("save_image"))
