"""monai-nacl: Neighbor-Aware CaLibration (NACL) for MONAI segmentation."""

__version__ = "0.1.0"

# Subpackages are imported so that bundle expressions such as `$monai_nacl.data.check_datalist(...)` work
# after a plain `$import monai_nacl`.
from monai_nacl import calibration, data, handlers, inferers, losses, metrics, transforms  # noqa: E402

__all__ = ["calibration", "data", "handlers", "inferers", "losses", "metrics", "transforms", "__version__"]
