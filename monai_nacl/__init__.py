"""monai-nacl: Neighbor-Aware CaLibration (NACL) for MONAI segmentation."""

__version__ = "0.1.0"

# Subpackages are imported so that bundle expressions such as `$monai_nacl.data.check_datalist(...)` work
# after a plain `$import monai_nacl`.
from monai_nacl import data, distributed, handlers, inferers, losses, metrics, temperature, transforms  # noqa: E402

__all__ = [
    "data",
    "distributed",
    "handlers",
    "inferers",
    "losses",
    "metrics",
    "temperature",
    "transforms",
    "__version__",
]


def __getattr__(name: str):
    # `$monai_nacl.calibration....` in bundles written for 0.1 (the module warns that the name is deprecated)
    if name == "calibration":
        import importlib

        return importlib.import_module("monai_nacl.calibration")
    raise AttributeError(f"module 'monai_nacl' has no attribute {name!r}")
