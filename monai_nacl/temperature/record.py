"""Calibrated weights on disk: a ``TemperatureScaled`` state_dict plus a provenance record beside it.

``models/model.pt`` holds the weights with their temperature(s) and the fingerprint of the weights the
temperature was fitted for (buffer ``calibrated_for``); ``models/model.calibration.json`` says how that
temperature came about (when, on how many voxels, the calibration before and after, the validation metric of
the weights). :func:`save_calibrated` refuses to write a temperature that was not set for the weights beside
it, so a ``model.pt`` written through it is always calibrated for its own weights.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.networks.utils import save_state

from monai_nacl.temperature.scaling import StaleTemperatureWarning, weights_fingerprint

__all__ = [
    "atomic_save",
    "record_path",
    "save_calibrated",
    "read_calibration_record",
    "check_calibration_record",
    "warn_if_not_calibrated",
]

logger = logging.getLogger(__name__)


def _finite(value):
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def record_path(weights_path: str | Path) -> Path:
    """``models/model.pt`` → ``models/model.calibration.json``."""
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.stem + ".calibration.json")


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """``write`` a temporary file in ``path``'s folder, then rename it to ``path``: a crash or an error leaves the
    previous ``path`` (or none), never half a file. The file gets the permissions a plain write would give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file beside it and a rename (see :func:`save_calibrated`
    for why not ``monai.networks.utils.save_state(atomic=True)``)."""
    return _replace_atomically(Path(path), lambda tmp: torch.save(obj, tmp))


def _fingerprint_hex(value: int) -> str:
    return f"{int(value):016x}"


def save_calibrated(state: Mapping[str, torch.Tensor], path: str | Path, **provenance: Any) -> dict:
    """Write a :class:`~monai_nacl.temperature.TemperatureScaled` state_dict to ``path`` (atomically) and its
    calibration record to :func:`record_path` ``(path)``.

    The weights are serialised by ``monai.networks.utils.save_state`` into a temporary file beside ``path`` that is
    then renamed over it, and so is the record: a run killed while saving keeps the previous model. (``save_state``'s
    own ``atomic=True`` deletes the existing file first and writes in the system temporary folder, which may be
    another file system, so a crash there can leave no model or half of one.)

    Args:
        state: the wrapper's state_dict; its ``calibrated_for`` must be the fingerprint of its own weights.
        path: destination of the weights, e.g. ``models/model.pt``.
        provenance: JSON-serialisable facts added to the record (epoch, metrics, voxels used, ECE before/after).

    Returns:
        The record written.

    Raises:
        ValueError: ``state`` is not a ``TemperatureScaled`` state_dict, or its temperature was set for other
            weights (``calibrated_for`` differs from the weights' fingerprint).
    """
    if "temperature" not in state or "calibrated_for" not in state:
        raise ValueError(
            f"{path}: state must be a monai_nacl.temperature.TemperatureScaled state_dict with 'temperature' and "
            f"'calibrated_for', got keys {sorted(state)[:5]}..."
        )
    fingerprint = weights_fingerprint(state)
    if int(state["calibrated_for"]) != fingerprint:
        raise ValueError(
            f"{path}: the temperature in this state_dict was set for other weights (calibrated_for "
            f"{_fingerprint_hex(state['calibrated_for'])}, weights {_fingerprint_hex(fingerprint)}); fit it for these "
            "weights first (TemperatureScaled.set_temperature records the weights it is set for)."
        )
    path = Path(path)
    record = {
        "weights": path.name,
        "weights_fingerprint": _fingerprint_hex(fingerprint),
        "temperature": [float(t) for t in state["temperature"].flatten()],
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance,
    }
    # strict JSON (NaN -> null); fail on unserialisable provenance before writing anything
    text = json.dumps(_finite(record), indent=4, default=float, allow_nan=False)
    # before the new weights land: a client must never meet them next to thresholds fitted for the old ones
    _drop_stale_conformal_record(path, record["weights_fingerprint"], record["temperature"])
    _replace_atomically(path, lambda tmp: save_state(dict(state), tmp, atomic=False))
    _replace_atomically(record_path(path), lambda tmp: tmp.write_text(text + "\n"))
    return record


def _drop_stale_conformal_record(path: Path, fingerprint: str, temperature: list[float]) -> None:
    """Delete the conformal record beside ``path`` unless it was fitted for the weights about to be written there
    (``fingerprint``, ``temperature``); an unreadable record goes too.

    New weights (a fine-tune, a better epoch) invalidate conformal thresholds; a stale record left on disk could be
    served, so it goes, and inference adds no conformal outputs until ``calibrate.json`` fits a new one.
    """
    # the rule check_conformal_record applies, so a record kept here is never reported stale afterwards
    from monai_nacl.conformal.record import _same_temperature, conformal_record_path

    target = conformal_record_path(path)
    if not target.is_file():
        return
    try:
        fitted = json.loads(target.read_text())
        keep = fitted.get("weights_fingerprint") == fingerprint and _same_temperature(
            fitted["temperature"], temperature
        )
    except (ValueError, OSError, TypeError, AttributeError, KeyError):
        keep = False
    if not keep:
        target.unlink()
        logger.info("%s: removed %s (fitted for other weights or temperatures).", path, target.name)


def read_calibration_record(path: str | Path) -> dict | None:
    """The record beside the weights at ``path`` (``None`` if there is none).

    Raises:
        ValueError: the record exists but is not valid JSON (its path is named).
    """
    target = record_path(path)
    if not target.is_file():
        return None
    try:
        return json.loads(target.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{target}: not a valid calibration record: {e}") from e


def check_calibration_record(path: str | Path, inferer: Any = None) -> list[str]:
    """Problems with the calibration of the weights at ``path``; an empty list when the temperature stored in them
    was fitted for them and the record beside them says so.

    Args:
        path: the weights, e.g. ``models/model.pt``.
        inferer: the inferer the probabilities will be computed with (or its
            :func:`~monai_nacl.inferers.describe_inferer` string): a record that names another one (mirror test-time
            augmentation on or off, another window) is a problem. Records written before inferers were recorded
            name none and are not checked for it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` cannot be read as a state_dict (the path is named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: cannot be read as weights ({type(e).__name__}: {e})") from e
    problems = []
    if not isinstance(state, Mapping) or "temperature" not in state:
        return [f"{path}: not a TemperatureScaled state_dict (no 'temperature')"]
    fingerprint = _fingerprint_hex(weights_fingerprint(state))
    fitted_for = _fingerprint_hex(state.get("calibrated_for", 0))
    if fitted_for == _fingerprint_hex(0):
        problems.append(f"{path}: no record of the weights its temperature was fitted for")
    elif fitted_for != fingerprint:
        problems.append(f"{path}: temperature fitted for weights {fitted_for}, these are {fingerprint}")
    record = read_calibration_record(path)
    if record is None:
        problems.append(f"{record_path(path)}: missing")
    else:
        if record.get("weights_fingerprint") != fingerprint:
            problems.append(
                f"{record_path(path)}: written for weights {record.get('weights_fingerprint')}, {path.name} holds "
                f"{fingerprint}"
            )
        stored = [float(t) for t in state["temperature"].flatten()]
        if record.get("temperature") != stored:
            problems.append(f"{record_path(path)}: temperature {record.get('temperature')}, weights hold {stored}")
        problems += inferer_problems(record_path(path), "temperature", record.get("inferer"), inferer)
    return problems


def inferer_problems(target: Path, what: str, fitted_with: str | None, inferer: Any) -> list[str]:
    """``[problem]`` when a record's inferer (``fitted_with``) is known and differs from ``inferer``, else ``[]``."""
    from monai_nacl.inferers import describe_inferer

    if fitted_with is None:  # a record from before inferers were recorded: nothing to compare with
        return []
    used = describe_inferer(inferer)
    if used is None or fitted_with == used:
        return []
    return [
        f"{target}: {what} fitted on the probabilities of {fitted_with}, inference uses {used} (calibrate with the "
        "inferer settings inference uses, e.g. the same mirror_tta, or infer with the calibrated ones)"
    ]


def warn_if_not_calibrated(
    path: str | Path, missing_ok: bool = False, strict: bool = False, inferer: Any = None
) -> list[str]:
    """Warn (``StaleTemperatureWarning``, and the log) for each problem :func:`check_calibration_record` finds in
    the weights at ``path``; return them. The bundles' ``inference.json`` runs it before loading ``model.pt``, so
    an unreadable or stale model is reported before any image is processed.

    Args:
        path: the weights, e.g. ``models/model.pt``.
        missing_ok: a missing file is a warning (a bundle that ships configs only), not an error.
        strict: raise instead of warning (the bundles' ``require_calibrated``).
        inferer: the inferer inference uses (see :func:`check_calibration_record`).

    Raises:
        FileNotFoundError: the file is missing (without ``missing_ok``).
        ValueError: the file cannot be read as weights (the path is named), or, with ``strict``, any problem.
    """
    if missing_ok and not Path(path).is_file():
        logger.warning("%s not found: inference needs trained weights there (or ckpt_dir pointing at them)", path)
        return [f"{path}: not found"]
    return report_problems(
        check_calibration_record(path, inferer),
        strict=strict,
        refusal="the model is not known to be calibrated for its weights and this inferer: {problems}. Refit the "
        "temperature (calibrate.json, with the inferer settings inference uses) or, to use it anyway, set "
        "require_calibrated to false.",
        consequence="the probabilities may not be calibrated",
        category=StaleTemperatureWarning,
    )


def report_problems(
    problems: list[str], *, strict: bool, refusal: str, consequence: str, category: type[Warning]
) -> list[str]:
    """How the record checks report: raise one ``ValueError`` naming every problem (``strict``), or log and warn
    each one (the warning pointing at the code that asked for the check); return ``problems``.

    Args:
        problems: what a check found (empty: nothing is reported).
        strict: raise instead of warning.
        refusal: the error message, with ``{problems}`` where the problems go.
        consequence: what each problem means, appended to it in the log.
        category: the warning class.
    """
    if strict and problems:
        raise ValueError(refusal.format(problems="; ".join(problems)))
    for problem in problems:
        logger.warning("%s: %s", problem, consequence)
        warnings.warn(problem, category, stacklevel=3)
    return problems
