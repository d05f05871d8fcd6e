"""Ignite handler: fit conformal risk control and volume intervals on an evaluator's pass, write the record."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing

from monai_nacl.conformal.methods import (
    ConformalPredictionSets,
    ConformalRiskControl,
    ConformalVolumeIntervals,
    _check_alpha,
    _Conformal,
)
from monai_nacl.conformal.record import CONFORMAL_KINDS, save_conformal
from monai_nacl.distributed import all_gather_rows, all_reduce_sum, world_size
from monai_nacl.inferers import describe_inferer
from monai_nacl.temperature.scaling import weights_fingerprint

__all__ = ["ConformalFitHandler", "case_spacing"]

logger = logging.getLogger(__name__)


def case_spacing(prob: torch.Tensor, spatial_dims: int = 3) -> list[float] | None:
    """Voxel spacing (mm) of one case's ``C,*spatial`` tensor from its affine; ``None`` without one (1 mm assumed
    by the volume methods).

    Args:
        prob: the case's probabilities (a ``MetaTensor`` carries the affine).
        spatial_dims: spatial dimensions.

    Returns:
        ``spatial_dims`` spacings in mm, or ``None``.
    """
    if not isinstance(prob, MetaTensor):
        return None
    affine = prob.affine
    if affine.ndim == 3:  # a batched affine left on a single case
        affine = affine[0]
    return [float(s) for s in affine_to_spacing(affine, r=spatial_dims)]


class ConformalFitHandler:
    """Fit conformal methods on the calibrated probabilities an evaluator produces over a calibration split, and
    write ``model.conformal.json`` beside the weights (:func:`~monai_nacl.conformal.save_conformal`).

    Attach to an evaluator that runs the (temperature-scaled) network in eval mode over the labelled calibration
    cases, *after* the temperature is final (in a bundle: a second evaluator run after the one that fits ``T``).
    Each iteration adds its cases; at ``COMPLETED`` each method is fitted for every ``alpha`` and the record is
    written with the fingerprint and temperature of ``network``. The calibration state is bounded: loss curves for
    risk control, ``C`` numbers per case for volume intervals (and a voxel sample per case for prediction sets).

    Distributed (``torch.distributed``, every rank running the evaluator on its share of the cases, as with a
    ``DistributedSampler``, shares of any size): attach it on every rank. At ``COMPLETED`` the calibration state of
    all ranks is gathered (each method's ``all_gather``), every rank fits on all the cases, and rank 0 writes the
    record: the fit one process would make on the same cases (it does not depend on their order; prediction sets
    that sample voxels draw another uniform sample). The ranks must hold the same temperature.

    Args:
        network: the network whose probabilities are seen (its weights fingerprint and ``temperature`` go into the
            record; the temperature must not change during the pass).
        num_classes: number of classes ``C``.
        alphas: the levels to fit (e.g. ``[0.1, 0.05]``), each in ``(0, 1)``.
        methods: any of ``"risk_control"``, ``"volume_intervals"``, ``"prediction_sets"``.
        output_transform: maps ``engine.state.output`` to ``(probabilities, labels)``: per-case lists (decollated,
            ``C,*spatial`` and ``1,*spatial``) or batched tensors. Probabilities after softmax, not logits; their
            affine (``MetaTensor``) gives the voxel spacing of the volumes.
        save_path: the weights beside which the record is written (e.g. ``models/model.pt``; the file must hold
            these weights); ``None``: fit only.
        class_names: names of the classes, stored in the record.
        bins: threshold grid of risk control.
        scale: volume-interval scale (``"std"`` or ``"none"``).
        ignore_index: label value left out of calibration.
        sets_method: ``"lac"`` or ``"aps"`` for prediction sets.
        voxels_per_volume: voxels sampled per case for prediction sets.
        spatial_dims: spatial dimensions of the volumes.
        provenance: JSON-serialisable facts added to the record (e.g. ``data="validation split"``).

    Raises:
        ValueError: bad ``alphas`` or ``methods``; ``provenance`` keys the handler writes itself (``fitted_by``,
            ``inferer``, ``cases``); at ``COMPLETED``, no case seen (on any rank), a temperature that
            changed during the pass (fitting on probabilities of another temperature would make a stale record), or
            ranks holding different temperatures.

    Example:
        >>> fit = ConformalFitHandler(network, 3, alphas=[0.1, 0.05], save_path="models/model.pt",
        ...                           output_transform=monai.handlers.from_engine(["prob", "label_index"]))
        >>> fit.attach(evaluator)
        >>> evaluator.run()  # writes models/model.conformal.json
    """

    def __init__(
        self,
        network: torch.nn.Module,
        num_classes: int,
        alphas: Sequence[float] = (0.1, 0.05),
        methods: Sequence[str] = ("risk_control", "volume_intervals"),
        output_transform: Callable = lambda x: x,
        save_path: str | Path | None = None,
        class_names: Sequence[str] | None = None,
        bins: int = 1000,
        scale: str = "std",
        ignore_index: int | None = None,
        sets_method: str = "lac",
        voxels_per_volume: int = 20000,
        spatial_dims: int = 3,
        **provenance: Any,
    ) -> None:
        if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence) or not alphas:
            raise ValueError(f"alphas must be a non-empty sequence of levels in (0, 1), got {alphas!r}.")
        self.alphas = [_check_alpha(a) for a in alphas]
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"alphas has repeated values: {list(alphas)}.")
        if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
            raise ValueError(f"methods must be a non-empty sequence of {sorted(CONFORMAL_KINDS)}, got {methods!r}.")
        unknown = [m for m in methods if m not in CONFORMAL_KINDS]
        if unknown or len(set(methods)) != len(methods):
            raise ValueError(f"methods must be distinct names from {sorted(CONFORMAL_KINDS)}, got {list(methods)}.")
        self.network, self.output_transform = network, output_transform
        self.save_path = None if save_path is None else Path(save_path)
        self.spatial_dims = spatial_dims
        clash = sorted(set(provenance) & {"fitted_by", "inferer", "cases"})
        if clash:
            raise ValueError(f"provenance keys {clash} are written by the handler itself; name them otherwise.")
        self.provenance = provenance
        common = {"num_classes": num_classes, "class_names": class_names, "spatial_dims": spatial_dims}
        self.estimators: dict[str, _Conformal] = {}
        for method in methods:
            if method == "risk_control":
                self.estimators[method] = ConformalRiskControl(bins=bins, ignore_index=ignore_index, **common)
            elif method == "volume_intervals":
                self.estimators[method] = ConformalVolumeIntervals(scale=scale, ignore_index=ignore_index, **common)
            else:
                self.estimators[method] = ConformalPredictionSets(
                    method=sets_method, voxels_per_volume=voxels_per_volume, ignore_index=ignore_index, **common
                )
        self.fitted: list[_Conformal] = []
        self.record: dict | None = None
        self.num_cases = 0
        self._temperature: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        """Reset at each run's start, add cases at each iteration, gather (distributed), fit and write at
        ``COMPLETED``."""
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._fit)

    def _current_temperature(self) -> torch.Tensor | None:
        module = getattr(self.network, "module", self.network)
        t = getattr(module, "temperature", None)
        return None if t is None else t.detach().flatten().double().cpu().clone()

    def _start(self, engine: Engine) -> None:
        for estimator in self.estimators.values():
            estimator.reset()
        self.num_cases = 0
        self._temperature = self._current_temperature()

    def _cases(self, output: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not isinstance(output, (tuple, list)) or len(output) != 2:
            raise ValueError(f"output_transform must return (probabilities, labels), got {type(output).__name__}.")
        probs, labels = output
        if isinstance(probs, torch.Tensor) and probs.ndim == self.spatial_dims + 2:
            probs = list(probs)
            labels = list(labels) if isinstance(labels, torch.Tensor) else labels
        elif isinstance(probs, torch.Tensor):
            probs, labels = [probs], [labels]
        if len(probs) != len(labels):
            raise ValueError(f"output_transform returned {len(probs)} probability and {len(labels)} label items.")
        return list(zip(probs, labels))

    def _collect(self, engine: Engine) -> None:
        for prob, label in self._cases(self.output_transform(engine.state.output)):
            spacing = case_spacing(prob, self.spatial_dims)
            p = prob.as_tensor() if isinstance(prob, MetaTensor) else prob
            y = label.as_tensor() if isinstance(label, MetaTensor) else label
            for method, estimator in self.estimators.items():
                if method == "volume_intervals":
                    estimator.update(p, y, spacing=spacing)
                else:
                    estimator.update(p, y)
            self.num_cases += 1

    def _gather(self, now: torch.Tensor | None) -> list[torch.Tensor]:
        """Distributed: every rank's cases into each estimator, the case count summed; the temperature of each
        rank (empty: none). Collectives only, in the same order on every rank, before any check that may raise."""
        self.num_cases = int(all_reduce_sum(torch.tensor([self.num_cases], dtype=torch.int64)))
        temperatures = all_gather_rows(torch.zeros(0, dtype=torch.float64) if now is None else now)
        if self.num_cases:
            for estimator in self.estimators.values():
                estimator.all_gather()
        return temperatures

    def _fit(self, engine: Engine) -> None:
        now = self._current_temperature()
        ranks = world_size()
        temperatures = self._gather(now) if ranks > 1 else []
        before = self._temperature
        here = (now is None) != (before is None) or (now is not None and not torch.equal(now, before))
        changed = here
        # decided together: a rank that raised alone would let rank 0 write a record of mixed probabilities
        if ranks > 1:
            changed = bool(all_reduce_sum(torch.tensor([int(here)])).item())
        if self.num_cases == 0:
            where = f" on any of the {ranks} processes" if ranks > 1 else ""
            raise ValueError(f"ConformalFitHandler saw no case{where}: the evaluator's data loader is empty.")
        if changed:
            raise ValueError(
                "the network's temperature changed during the conformal pass "
                f"({f'{before} -> {now}' if here else 'on another rank'}): its probabilities "
                "mix temperatures. Run the conformal evaluator after the temperature is fitted (a separate run)."
            )
        if any(t.shape != temperatures[0].shape or not torch.equal(t, temperatures[0]) for t in temperatures):
            raise ValueError(
                f"the ranks hold different temperatures ({[t.tolist() for t in temperatures]}): their probabilities "
                "cannot be pooled. Fit the temperature on all ranks together (TemperatureFitHandler gathers them) "
                "or load the same calibrated weights on every rank."
            )
        fitted = []
        for alpha in self.alphas:
            if math.ceil((self.num_cases + 1) * (1 - alpha)) > self.num_cases:
                # the finite-sample quantile does not exist: the fit is the trivial, always-safe one
                logger.warning(
                    "conformal alpha %s needs at least %d calibration cases, got %d: its masks and intervals are "
                    "trivial (outer mask everything, inner mask empty, intervals unbounded); fit on more cases or "
                    "use alpha >= %.3f.",
                    alpha,
                    math.ceil(1 / alpha - 1),
                    self.num_cases,
                    1 / (self.num_cases + 1),
                )
            for estimator in self.estimators.values():
                estimator.fit(alpha)
                copy = type(estimator)(estimator.num_classes, spatial_dims=estimator.spatial_dims)
                copy.load_state_dict(estimator.state_dict())
                fitted.append(copy)
                logger.info("conformal %s, alpha %s: %s", estimator.kind, alpha, _summary(copy))
        self.fitted = fitted
        if self.save_path is not None and idist.get_rank() == 0:
            self.record = save_conformal(
                self.save_path,
                fitted,
                weights_fingerprint=weights_fingerprint(self.network),
                temperature=now,
                fitted_by="ConformalFitHandler",
                inferer=describe_inferer(getattr(engine, "inferer", None)),
                cases=self.num_cases,
                **self.provenance,
            )


def _summary(obj: _Conformal) -> str:
    if isinstance(obj, ConformalRiskControl):
        return f"inner {obj.inner_threshold.tolist()}, outer {obj.outer_threshold.tolist()} (n {obj.n})"
    if isinstance(obj, ConformalVolumeIntervals):
        return f"quantile {obj.quantile.tolist()} (n {obj.n})"
    return f"threshold {obj.threshold} (n {obj.n})"
