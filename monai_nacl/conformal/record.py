"""Fitted conformal methods on disk: ``models/model.conformal.json`` beside the weights they were fitted for.

Conformal thresholds are only valid for the probabilities they were fitted on, i.e. for one set of weights and one
temperature. The record therefore names the weights' fingerprint (:func:`~monai_nacl.temperature.weights_fingerprint`,
the value ``models/model.calibration.json`` holds) and the temperature, next to the fitted states. It follows
:mod:`monai_nacl.temperature.record`: :func:`save_conformal` refuses to write a record for other weights than the
ones beside it, :func:`check_conformal_record` lists what is stale, :func:`warn_if_conformal_stale` warns (or raises)
before inference uses it.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_nacl.conformal.methods import (
    ConformalPredictionSets,
    ConformalRiskControl,
    ConformalVolumeIntervals,
    _Conformal,
    _to_jsonable,
)
from monai_nacl.temperature.record import _fingerprint_hex, _replace_atomically, inferer_problems, report_problems
from monai_nacl.temperature.scaling import weights_fingerprint as _weights_fingerprint

__all__ = [
    "CONFORMAL_KINDS",
    "StaleConformalWarning",
    "conformal_record_path",
    "save_conformal",
    "read_conformal_record",
    "load_conformal",
    "check_conformal_record",
    "warn_if_conformal_stale",
]

logger = logging.getLogger(__name__)

CONFORMAL_KINDS: dict[str, type[_Conformal]] = {
    cls.kind: cls for cls in (ConformalPredictionSets, ConformalRiskControl, ConformalVolumeIntervals)
}
_RESERVED = (
    "weights",
    "weights_fingerprint",
    "temperature",
    "written",
    "num_classes",
    "class_names",
    "alphas",
    "fits",
)
_TEMPERATURE_RTOL = 1e-6


class StaleConformalWarning(UserWarning):
    """A conformal record does not belong to the weights (or temperature) beside it: its guarantees do not apply."""


def conformal_record_path(weights_path: str | Path) -> Path:
    """``models/model.pt`` -> ``models/model.conformal.json`` (a path already ending in ``.conformal.json`` is kept).

    Example:
        >>> conformal_record_path("models/model.pt").name
        'model.conformal.json'
    """
    weights_path = Path(weights_path)
    if weights_path.name.endswith(".conformal.json"):
        return weights_path
    return weights_path.with_name(weights_path.stem + ".conformal.json")


def _fingerprint(value: object) -> str:
    """A weights fingerprint as 16 hex digits, from the int :func:`weights_fingerprint` returns or its hex text."""
    if isinstance(value, str):
        text = value.strip().lower()
        if len(text) == 16 and all(ch in "0123456789abcdef" for ch in text) and int(text, 16):
            return text
    elif isinstance(value, (int, torch.Tensor)) and not isinstance(value, bool):
        number = int(value)
        if 0 < number < (1 << 64):
            return _fingerprint_hex(number)
    raise ValueError(
        f"weights_fingerprint must be a non-zero fingerprint of the weights (monai_nacl.temperature.weights_fingerprint: "
        f"an int, or its 16 hex digits), got {value!r}."
    )


def _temperature(value: object) -> list[float] | None:
    if value is None:
        return None
    try:
        t = torch.as_tensor(value, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"temperature must be a number or a sequence of numbers, got {value!r}.") from e
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"temperature must be positive finite numbers, got {value!r}.")
    return [float(x) for x in t]


def _same_temperature(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=_TEMPERATURE_RTOL) for x, y in zip(a, b))


def _load_weights(path: Path) -> Mapping:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: cannot be read as weights ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a state_dict (a {type(state).__name__}).")
    return state


def _stored_temperature(state: Mapping) -> list[float] | None:
    t = state.get("temperature")
    return None if t is None else [float(x) for x in torch.as_tensor(t).flatten()]


def _write_text_atomic(target: Path, text: str) -> None:
    _replace_atomically(target, lambda tmp: tmp.write_text(text + "\n"))


def save_conformal(
    path: str | Path,
    fitted: Sequence[_Conformal],
    weights_fingerprint: int | str,
    temperature: float | Sequence[float] | torch.Tensor | None = None,
    **provenance: Any,
) -> dict:
    """Write the fitted conformal objects to :func:`conformal_record_path` ``(path)``, beside the weights at ``path``
    (atomically; ``+inf`` thresholds as the string ``"inf"``).

    Args:
        path: the weights the objects were fitted with, e.g. ``models/model.pt``; the file must exist.
        fitted: fitted :class:`~monai_nacl.conformal.ConformalPredictionSets`,
            :class:`~monai_nacl.conformal.ConformalRiskControl` or
            :class:`~monai_nacl.conformal.ConformalVolumeIntervals` (any mix; one per kind and ``alpha``), all with
            the same number of classes.
        weights_fingerprint: :func:`~monai_nacl.temperature.weights_fingerprint` of the network whose probabilities
            were used (an int or its 16 hex digits).
        temperature: the temperature(s) the probabilities were computed with (``None``: not recorded, not checked).
        provenance: JSON-serialisable facts added to the record (who fitted, on what data, how many cases).

    Returns:
        The record written (a dict; its ``fits`` are the objects' JSON states).

    Raises:
        FileNotFoundError: no weights file at ``path``.
        ValueError: ``fitted`` empty, not fitted, of mixed class counts or with a repeated (kind, alpha); a bad
            fingerprint or temperature; a provenance key that clashes with the record's own keys; or the weights at
            ``path`` are not those of ``weights_fingerprint`` (or hold another temperature): a stale record is
            never written.

    Example:
        >>> save_conformal("models/model.pt", [crc, vol], weights_fingerprint(network), network.temperature)
    """
    path = Path(path)
    fingerprint = _fingerprint(weights_fingerprint)
    temperature = _temperature(temperature)
    if isinstance(fitted, _Conformal) or not isinstance(fitted, Sequence) or not fitted:
        raise ValueError(f"fitted must be a non-empty sequence of fitted conformal objects, got {fitted!r}.")
    seen: set[tuple[str, float]] = set()
    for obj in fitted:
        if not isinstance(obj, _Conformal):
            raise ValueError(f"fitted holds a {type(obj).__name__}, not a conformal object.")
        obj._require_fitted()
        if obj.num_classes != fitted[0].num_classes:
            raise ValueError(
                f"fitted objects have different class counts ({fitted[0].num_classes} and {obj.num_classes})."
            )
        if (obj.kind, obj.alpha) in seen:
            raise ValueError(f"fitted holds two {obj.kind!r} objects for alpha={obj.alpha}.")
        seen.add((obj.kind, obj.alpha))
    clash = sorted(set(provenance) & set(_RESERVED))
    if clash:
        raise ValueError(f"provenance keys {clash} are the record's own keys; name them otherwise.")

    state = _load_weights(path)
    actual = _fingerprint_hex(_weights_fingerprint(state))
    if actual != fingerprint:
        raise ValueError(
            f"{path}: holds weights {actual}, but the conformal objects were fitted for weights {fingerprint}; "
            "refit them with these weights (a stale record is not written)."
        )
    stored = _stored_temperature(state)
    if temperature is not None and stored is not None and not _same_temperature(stored, temperature):
        raise ValueError(
            f"{path}: holds temperature {stored}, but the conformal objects were fitted with temperature "
            f"{temperature}; refit them after the temperature (a stale record is not written)."
        )
    names = next((obj.class_names for obj in fitted if obj.class_names is not None), None)
    record = {
        "weights": path.name,
        "weights_fingerprint": fingerprint,
        "temperature": temperature,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_classes": fitted[0].num_classes,
        "class_names": names,
        "alphas": sorted({float(obj.alpha) for obj in fitted}, reverse=True),
        **provenance,
        "fits": [obj.state_dict() for obj in fitted],
    }
    # strict JSON (+inf as "inf"); fail on unserialisable provenance before writing anything
    text = json.dumps(_to_jsonable(record), indent=4, default=float, allow_nan=False)
    _write_text_atomic(conformal_record_path(path), text)
    logger.info("wrote %s (%d fits, alphas %s)", conformal_record_path(path), len(fitted), record["alphas"])
    return json.loads(text)


def read_conformal_record(path: str | Path) -> dict | None:
    """The conformal record beside the weights at ``path`` (or at ``path`` itself if it ends in
    ``.conformal.json``); ``None`` if there is none.

    Raises:
        ValueError: the record exists but is not valid JSON or lacks its ``fits`` (its path is named).
    """
    target = conformal_record_path(path)
    if not target.is_file():
        return None
    try:
        record = json.loads(target.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{target}: not a valid conformal record: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("fits"), list):
        raise ValueError(f"{target}: not a conformal record (no list of 'fits').")
    return record


def load_conformal(path: str | Path | Mapping, kind: str, alpha: float | None = None) -> _Conformal:
    """One fitted object from a conformal record.

    Args:
        path: the weights (``models/model.pt``), the record's path, or a record already read.
        kind: ``"risk_control"``, ``"volume_intervals"`` or ``"prediction_sets"``.
        alpha: which fit (``None``: the only fit of ``kind``).

    Returns:
        the fitted :class:`~monai_nacl.conformal.ConformalRiskControl`,
        :class:`~monai_nacl.conformal.ConformalVolumeIntervals` or
        :class:`~monai_nacl.conformal.ConformalPredictionSets`.

    Raises:
        FileNotFoundError: no record.
        ValueError: an unknown ``kind``; no fit of ``kind`` at ``alpha`` (the ones available are named); ``alpha``
            ``None`` with several fits of ``kind``; a malformed record.

    Example:
        >>> crc = load_conformal("models/model.pt", "risk_control", alpha=0.1)
    """
    if kind not in CONFORMAL_KINDS:
        raise ValueError(f"kind must be one of {sorted(CONFORMAL_KINDS)}, got {kind!r}.")
    if isinstance(path, Mapping):
        record, where = dict(path), "the record"
    else:
        record, where = read_conformal_record(path), str(conformal_record_path(path))
        if record is None:
            raise FileNotFoundError(
                f"{where} not found: fit the conformal methods first (the bundle's calibrate.json writes it)."
            )
    fits = [f for f in record.get("fits", []) if isinstance(f, Mapping) and f.get("kind") == kind]
    available = [f.get("alpha") for f in fits]
    if alpha is None:
        if len(fits) != 1:
            raise ValueError(f"{where} has {len(fits)} {kind!r} fits (alpha {available}): choose one with alpha.")
        chosen = fits[0]
    else:
        matches = [f for f in fits if math.isclose(float(f.get("alpha", math.nan)), float(alpha), rel_tol=1e-9)]
        if not matches:
            raise ValueError(f"{where} has no {kind!r} fit for alpha={alpha}; it has alpha {available}.")
        chosen = matches[0]
    cls = CONFORMAL_KINDS[kind]
    try:
        return cls.from_json(json.dumps(chosen))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: malformed {kind!r} fit ({type(e).__name__}: {e}).") from e


def check_conformal_record(path: str | Path, inferer: Any = None) -> list[str]:
    """Problems with the conformal record of the weights at ``path``; an empty list when the record exists and was
    fitted for these weights and their temperature (and, with ``inferer``, on that inferer's probabilities: see
    :func:`~monai_nacl.temperature.check_calibration_record`).

    Raises:
        FileNotFoundError: no weights file at ``path``.
        ValueError: ``path`` cannot be read as a state_dict, or the record is not valid JSON.
    """
    path = Path(path)
    state = _load_weights(path)
    record = read_conformal_record(path)
    target = conformal_record_path(path)
    if record is None:
        return [f"{target}: missing"]
    problems = []
    actual = _fingerprint_hex(_weights_fingerprint(state))
    if record.get("weights_fingerprint") != actual:
        problems.append(f"{target}: fitted for weights {record.get('weights_fingerprint')}, {path.name} holds {actual}")
    stored, fitted_with = _stored_temperature(state), record.get("temperature")
    if stored is not None and fitted_with is not None and not _same_temperature(stored, fitted_with):
        problems.append(f"{target}: fitted with temperature {fitted_with}, {path.name} holds {stored}")
    return problems + inferer_problems(target, "thresholds", record.get("inferer"), inferer)


def warn_if_conformal_stale(path: str | Path, strict: bool = False, inferer: Any = None) -> list[str]:
    """Warn (:class:`StaleConformalWarning`, and the log) for each problem :func:`check_conformal_record` finds;
    return them.

    Args:
        path: the weights, e.g. ``models/model.pt``.
        strict: raise instead of warning.
        inferer: the inferer inference uses (a record fitted on another one's probabilities is stale).

    Raises:
        FileNotFoundError: no weights file at ``path``.
        ValueError: unreadable weights or record, or, with ``strict``, any problem.
    """
    return report_problems(
        check_conformal_record(path, inferer),
        strict=strict,
        refusal="the conformal record does not belong to these weights, temperature and inferer: {problems}. Refit "
        "it (calibrate.json) with the weights, temperature and inferer settings inference uses.",
        consequence="the conformal guarantees do not apply",
        category=StaleConformalWarning,
    )
