"""Stand-in for ``torchvision``, used by the ``monailabel_nacl`` app only when the real one cannot be imported.

MONAI Label 0.8.5 imports ``torchvision.utils`` at module level in ``monailabel.transform.post`` (and in the
DeepEdit handlers), which ``BundleInferTask`` imports. PyPI's Linux torchvision wheels are CUDA builds that do not
load beside a CPU torch (``operator torchvision::nms does not exist``). ``main.py`` puts this folder on ``sys.path``
only after ``import torchvision.utils`` has failed, so a working torchvision always wins.

``__version__`` is ``0.0.0`` so that version-checked optional imports (MONAI's ``optional_import`` with a minimum
version) treat torchvision as missing.
"""

__version__ = "0.0.0"
STANDIN = True
