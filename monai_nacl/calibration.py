"""Former name of :mod:`monai_nacl.temperature`, kept so bundles written for monai-nacl 0.1 still run.

``monai_nacl.calibration.TemperatureScaled`` (a bundle's ``_target_``) and ``$monai_nacl.calibration....``
expressions resolve to the same objects as ``monai_nacl.temperature``, with a ``DeprecationWarning``.
"""

import warnings

from monai_nacl.temperature import *  # noqa: F403
from monai_nacl.temperature import __all__  # noqa: F401

warnings.warn(
    "monai_nacl.calibration is now monai_nacl.temperature; the old name will be removed in a later release.",
    DeprecationWarning,
    stacklevel=2,
)
