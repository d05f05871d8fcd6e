"""Ignite handlers: calibration metrics in ``engine.state.metrics``, reliability diagrams, temperature fitting."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import ignite.distributed as idist
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.utils import evenly_divisible_all_gather, get_dist_device

from monai_nacl.distributed import broadcast_from_rank0
from monai_nacl.inferers import describe_inferer
from monai_nacl.metrics.calibration import KEYS, CalibrationMetric
from monai_nacl.temperature.record import atomic_save, save_calibrated  # atomic_save: re-exported
from monai_nacl.temperature.scaling import TemperatureFitter, TemperatureScaled, compose_temperature
from monai_nacl.visualize.reliability import plot_reliability

__all__ = ["CalibrationHandler", "ReliabilityDiagramHandler", "TemperatureFitHandler", "atomic_save"]

logger = logging.getLogger(__name__)


class CalibrationHandler(Metric):
    """Attach :class:`~monai_nacl.metrics.CalibrationMetric` to an evaluator.

    After each evaluation run, every key is stored as ``engine.state.metrics[f"{name}_{key}"]`` (e.g.
    ``val_ece``, ``val_cece``), which ``StatsHandler`` and TensorBoard handlers log; with ``save_details`` the
    per-volume values go to ``engine.state.metric_details`` under the same names, which ``MetricsSaver``
    writes as per-case CSV.

    Args:
        num_classes, num_bins, mask, ignore_index: see :class:`~monai_nacl.metrics.CalibrationMetric`
            (``mask="foreground"`` is the NACL paper protocol).
        reduction: ``"macro"`` (mean over volumes) or ``"micro"`` (pooled voxels).
        binning: ``"uniform"`` (equal-width bins, the NACL paper's ECE) or ``"adaptive"`` (equal-mass bins).
        output_transform: maps ``engine.state.output`` to ``(probabilities, labels)``, e.g.
            ``monai.handlers.from_engine(["pred_prob", "label"])``. Probabilities, not argmax.
        save_details: keep per-volume values for ``MetricsSaver``.
    """

    def __init__(
        self,
        num_classes: int,
        num_bins: int = 15,
        mask: str = "foreground",
        ignore_index: int | None = None,
        reduction: str = "macro",
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        binning: str = "uniform",
    ) -> None:
        if reduction not in ("macro", "micro"):
            raise ValueError(f"reduction must be 'macro' or 'micro', got {reduction!r}.")
        self.metric = CalibrationMetric(
            num_classes, num_bins, mask, ignore_index, per_volume=save_details, binning=binning
        )
        self.reduction, self.save_details = reduction, save_details
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self.metric.reset()

    def update(self, output: Sequence) -> None:
        if len(output) != 2:
            raise ValueError(f"output_transform must return (y_pred, y), got {len(output)} items.")
        self.metric(output[0], output[1])

    def compute(self) -> dict[str, float]:
        return self.metric.aggregate(self.reduction)

    def completed(self, engine: Engine, name: str) -> None:
        result = self.compute()
        for key, value in result.items():
            engine.state.metrics[f"{name}_{key}"] = value
        if self.save_details:
            rows = torch.tensor([[v[k] for k in KEYS] for v in self.metric.get_per_volume()], dtype=torch.float32)
            rows = rows.reshape(-1, len(KEYS))
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                rows = evenly_divisible_all_gather(rows.to(get_dist_device()), concat=True).cpu()  # NCCL: on GPU
            details = getattr(engine.state, "metric_details", None)
            if details is None:
                details = engine.state.metric_details = {}
            for i, key in enumerate(KEYS):
                details[f"{name}_{key}"] = rows[:, i : i + 1]


class ReliabilityDiagramHandler:
    """At the end of each evaluation, write ``{prefix}.png`` (reliability diagrams, top-label and per class)
    and ``{prefix}.json`` (the pooled bin statistics and the metrics) from a :class:`CalibrationHandler`.

    Args:
        calibration: the attached :class:`CalibrationHandler` whose statistics are drawn.
        output_dir: destination folder.
        class_names: names of the per-class panels.
        prefix: file name stem.
        per_epoch: add ``_epoch{N}`` to the names (for validation during training).
    """

    def __init__(
        self,
        calibration: CalibrationHandler,
        output_dir: str | Path,
        class_names: Sequence[str] | None = None,
        prefix: str = "reliability",
        per_epoch: bool = False,
    ) -> None:
        self.calibration, self.output_dir = calibration, Path(output_dir)
        self.class_names, self.prefix, self.per_epoch = class_names, prefix, per_epoch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        stats = self.calibration.metric.bin_statistics()
        result = self.calibration.compute()
        if idist.get_rank() != 0:
            return
        stem = self.prefix + (f"_epoch{engine.state.epoch}" if self.per_epoch else "")
        png = plot_reliability(stats, self.output_dir / f"{stem}.png", self.class_names)
        payload = {"metrics": result, "reduction": self.calibration.reduction, "bins": stats.to_dict()}
        (self.output_dir / f"{stem}.json").write_text(json.dumps(payload, indent=4))
        logger.info("wrote %s and %s", png, png.with_suffix(".json"))


class TemperatureFitHandler:
    """Fit the temperature of a :class:`~monai_nacl.temperature.TemperatureScaled` network on an evaluator's
    outputs, set it, and write the network's state_dict (atomically) to ``save_path``.

    Attach to an evaluator that runs the network on the validation split. The evaluator's output must
    carry the raw network output (logits, before softmax), e.g. copied to ``"logits"`` by a post transform.
    Distributed (every rank runs the evaluator on its share of the cases, as with a ``DistributedSampler``): the
    voxel samples of all ranks are gathered at the end of the pass (:meth:`TemperatureFitter.all_gather`), so every
    rank fits and sets the same temperature, on all the cases; rank 0 writes. Attach it on every rank.

    Args:
        network: the wrapped network (its current ``T`` is taken into account).
        num_classes: number of classes.
        output_transform: maps ``engine.state.output`` to ``(logits, labels)``.
        save_path: where to write ``network.state_dict()`` (e.g. ``models/model.pt``) with its calibration record
            beside it (:func:`~monai_nacl.temperature.save_calibrated`); ``None`` to skip.
        **fitter_kwargs: passed to :class:`~monai_nacl.temperature.TemperatureFitter`.
    """

    def __init__(
        self,
        network: TemperatureScaled,
        num_classes: int,
        output_transform: Callable = lambda x: x,
        save_path: str | Path | None = None,
        **fitter_kwargs,
    ) -> None:
        self.fitter = TemperatureFitter.for_network(network, num_classes, **fitter_kwargs)
        self.network, self.output_transform, self.save_path = network, output_transform, save_path
        self.fitted: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.fitter.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._fit)

    def _collect(self, engine: Engine) -> None:
        self.fitter.update_batch(*self.output_transform(engine.state.output))

    def _fit(self, engine: Engine) -> None:
        self.fitter.all_gather()  # the cases of every rank (a no-op on one process)
        # every rank fits on the same sample; rank 0's result is shared so the ranks agree to the last bit (the
        # conformal pass refuses ranks whose temperatures differ), even where their floating point does not
        correction = self.fitter.fit()
        correction = broadcast_from_rank0(correction).to(correction.device)
        before, after = self.fitter.score(), self.fitter.score(correction)
        total = compose_temperature(self.network.temperature, correction)
        self.network.set_temperature(total)
        self.fitted = total
        engine.state.metrics["temperature"] = total.tolist() if total.numel() > 1 else float(total)
        logger.info(
            "fitted temperature %s (correction %s; sample ECE %.4f -> %.4f)",
            total.tolist(),
            correction.tolist(),
            before["ece"],
            after["ece"],
        )
        if self.save_path is not None and idist.get_rank() == 0:
            save_calibrated(
                self.network.state_dict(),
                self.save_path,
                fitted_by="TemperatureFitHandler",
                inferer=describe_inferer(getattr(engine, "inferer", None)),
                foreground_margin=self.network.foreground_margin,
                mask=self.fitter.mask,
                voxels=self.fitter.num_voxels,
                volumes=self.fitter.num_volumes,
                sample_nll={"before": before["nll"], "after": after["nll"]},
                sample_ece={"before": before["ece"], "after": after["ece"]},
            )
