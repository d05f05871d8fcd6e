"""MONAI Label app that serves and trains this project's bundles, offline.

Every bundle found under the ``bundles`` option (default: this app's ``model/`` folder; each subfolder a bundle)
becomes a model named after its folder: inference through ``BundleInferTask`` (weights loaded with
``load_strict=True``) when it has ``models/model.pt`` or ``models/model.ts``, training through ``BundleTrainTask``
when it has ``configs/train.json``. Nothing is downloaded: no model zoo list, no pretrained weights.

    monailabel start_server --app apps/monailabel_nacl --studies STUDIES --conf bundles BUNDLES \
        --host 127.0.0.1 --port 8000

Options (``--conf KEY VALUE``):

* ``bundles``: one or more paths, separated by ``,`` or ``:``; each a bundle or a folder of bundles.
* ``load_strict``: ``true`` (default) or ``false``; strict state-dict loading for inference and for the
  checkpoint that training starts from.
* ``preload``: ``true`` to load the networks at start-up (MONAI Label's own option).
* ``networks_per_device``: how many loaded networks each bundle keeps per device (default 2), so requests that
  alternate between weight files (``model.pt``, ``model_dice_ce.pt``) do not reload them.

Training writes into the bundle folder (``models/model.pt``), so serve a copy of a bundle you want to keep.
See docs/monai_label.md.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections import OrderedDict
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent


def _ensure_torchvision_utils() -> None:
    """MONAI Label imports ``torchvision.utils`` at module level; fall back to ``compat/torchvision`` when the
    installed torchvision is missing or cannot load (PyPI's CUDA wheel beside a CPU torch)."""
    try:
        import torchvision.utils  # noqa: F401

        return
    except Exception:  # ImportError, or RuntimeError from a wheel built for another torch
        pass
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.path.insert(0, str(APP_DIR / "compat"))
    import torchvision.utils  # noqa: F401

    logging.getLogger(__name__).warning("torchvision is not importable; using %s", APP_DIR / "compat")


_ensure_torchvision_utils()

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402
from nacl_bundles import INFER_CONFIGS, TRAIN_CONFIGS, find_bundles, has_config, has_weights  # noqa: E402

logger = logging.getLogger(__name__)


def _file_identity(path: str) -> tuple:
    """What tells a weights file and its calibration record from other versions of them (see ``_get_network``): the
    file's resolved path and its record's path (two names of one file may have two records), then the stat of each
    (device, inode, size, mtime and ctime in ns; ``None`` for a missing record)."""
    from monai_nacl.temperature.record import record_path

    def stat(p: str):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    record = str(record_path(path))
    return (os.path.realpath(path), record, stat(path), stat(record))


def _networks_per_device(conf) -> int:
    """``--conf networks_per_device N``: how many networks an infer task keeps per device (default 2)."""
    value = str((conf or {}).get("networks_per_device", "2")).strip()
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise ValueError(f"--conf networks_per_device must be a positive integer, got {value!r}")
    return int(value)


class NACLBundleTrainTask(BundleTrainTask):
    """``BundleTrainTask`` whose run writes its best model back to the file it started from (the request's
    ``model_filename``, e.g. ``model_dice_ce.pt``), not always to ``model.pt``: the bundles' model saver takes
    the file name from ``validate#model_saver#filename``."""

    def __call__(self, request, datastore):
        name = request.get("model_filename", "model.pt")
        self._model_filename = name if isinstance(name, str) else name[0]
        return super().__call__(request, datastore)

    def _update_overrides(self, overrides):
        if self.bundle_config.get("validate#model_saver") is not None:
            overrides["validate#model_saver#filename"] = getattr(self, "_model_filename", "model.pt")
        return overrides


class NACLBundleInferTask(BundleInferTask):
    """``BundleInferTask`` whose postprocessing reads the records of the weights it serves: a request's
    ``model_filename`` (e.g. ``model_dice_ce.pt``) sets the bundle's ``weights_file``, so the conformal masks and
    volume intervals come from that file's record (none: no conformal outputs), never from ``model.pt``'s. Each
    weights file is checked against its calibration record when it is loaded (see ``_check_calibrated``)."""

    def __init__(self, path: str, conf: dict, **kwargs) -> None:
        # before super: with ``preload`` it loads the network from its __init__; a bad value stops the app at start
        self.networks_per_device = _networks_per_device(conf)
        self._network_lock = threading.RLock()
        self._network_cache: OrderedDict = OrderedDict()  # (device, file identity): MONAI Label's (network, mtime)
        super().__init__(path, conf, **kwargs)

    def pre_transforms(self, data=None):
        # set before the config is parsed for this request: changing it later would rebuild the preprocessing
        # that postprocessing's Invertd refers to, and the inversion would fail
        name = (data or {}).get("model_filename") or "model.pt"
        name = name if isinstance(name, str) else name[0]
        served = Path(self.path[0]).parent / name
        if self.bundle_config.get("weights_file") is not None:
            # the loader falls back to model.pt for a name it cannot find (basic_infer._get_network)
            target = str(served if served.is_file() else Path(self.path[0]))
            if self.bundle_config["weights_file"] != target:
                self.bundle_config["weights_file"] = target
        return super().pre_transforms(data)

    def _get_network(self, device, data):
        """MONAI Label caches one network per device and reuses it while the weights file's ``st_mtime`` is
        unchanged, whichever file the request names: of two files with equal times (a zip/tar extraction, ``cp -p``,
        ``os.utime``) the second is answered with the first's network, and a file replaced by one with the same time
        keeps serving the old weights; requests that alternate between two files reload the network each time.

        Here networks are cached per device and per file identity (:func:`_file_identity`: the file this request
        loads, which is super's choice of ``model_filename`` beside the bundle's weights if it exists, else the
        default, and its calibration record; a rewrite in place changes ctime, which cannot be set back). A file
        served before and unchanged gets its network back; a new or changed file is checked
        (:meth:`_check_calibrated`) and loaded by super. Each device keeps at most ``networks_per_device`` networks,
        loading included (``--conf networks_per_device N``, default 2: a bundle's NACL and CE+Dice weights): the
        least recently used is dropped first, an earlier version of the same file at once. A lock makes each call
        one step, so concurrent requests (``MONAI_LABEL_INFER_CONCURRENCY`` above 1) cannot file one file's network
        under another's identity."""
        with self._network_lock:
            path = self.get_path()
            name = (data or {}).get("model_filename") if self._config.get("model_filename") else None
            name = name[0] if isinstance(name, (list, tuple)) and name else name
            if isinstance(name, str) and os.path.exists(os.path.join(os.path.dirname(self.path[0]), name)):
                path = os.path.join(os.path.dirname(self.path[0]), name)
            key = _file_identity(path) if path else None
            cache = self._network_cache
            if (device, key) in cache:
                self._networks[device] = cache[(device, key)]
                cache.move_to_end((device, key))
                return super()._get_network(device, data)
            # a file not loaded yet, or changed: refused before anything is dropped, then room made for it
            self._networks.pop(device, None)
            if path:
                self._check_calibrated(path)
            on_device = [k for k in cache if k[0] == device]
            stale = [k for k in on_device if key and k[1] and k[1][:2] == key[:2]]  # earlier versions of this file
            rest = [k for k in on_device if k not in stale]
            for k in stale + rest[: max(0, len(rest) - (self.networks_per_device - 1))]:
                del cache[k]
            if stale:
                logger.warning("Reload model for %s: %s changed on disk (or its calibration record did)", device, path)
            else:
                logger.info("Load %s on %s (%d other networks kept)", path, device, len(cache))
            network = super()._get_network(device, data)
            if self._networks.get(device) is not None:
                cache[(device, key)] = self._networks[device]
            return network

    def clear_cache(self):
        """MONAI Label's ``clear_cache`` empties its per-device networks; the networks kept per file go too."""
        with self._network_lock:
            self._network_cache.clear()
            super().clear_cache()

    def clear(self):
        """Like :meth:`clear_cache`, for MONAI Label's ``clear``."""
        with self._network_lock:
            self._network_cache.clear()
            super().clear()

    def _check_calibrated(self, path: str) -> None:
        """What the bundle's ``initialize`` does before inference, which MONAI Label does not run: the weights'
        temperature must have been fitted for them, as their record says, through the inferer this bundle serves
        with; otherwise the request fails naming the problem (``require_calibrated``, default true) or a warning is
        logged. Checked once per weights file loaded."""
        from monai_nacl.temperature import warn_if_not_calibrated

        config = self.bundle_config
        strict = bool(config.get_parsed_content("require_calibrated")) if "require_calibrated" in config else True
        inferer = config.get_parsed_content("inferer") if "inferer" in config else None
        warn_if_not_calibrated(path, strict=strict, inferer=inferer)


class NACLBundleApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundles = find_bundles(conf.get("bundles"), Path(app_dir) / "model")
        self.load_strict = str(conf.get("load_strict", "true")).lower() in ("1", "true", "yes")
        logger.info("Bundles: %s", {k: str(v) for k, v in self.bundles.items()})
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai_nacl",
            description="NACL-calibrated segmentation bundles (monai-nacl)",
            version="1",
        )

    def init_infers(self):
        infers = {}
        for name, path in self.bundles.items():
            if has_config(path, INFER_CONFIGS) and has_weights(path):
                task = NACLBundleInferTask(str(path), self.conf, load_strict=self.load_strict)
                if task.is_valid():
                    infers[name] = task
        return infers

    def init_trainers(self):
        trainers = {}
        for name, path in self.bundles.items():
            if has_config(path, TRAIN_CONFIGS):
                task = NACLBundleTrainTask(str(path), self.conf, load_strict=self.load_strict)
                if task.is_valid():
                    trainers[name] = task
        return trainers

    def init_strategies(self):
        return {"random": Random(), "first": First()}
