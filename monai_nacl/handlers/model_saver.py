"""Keep the best model of a training run, always with temperature(s) fitted for its own weights."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import ignite.distributed as idist
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.handlers import from_engine

from monai_nacl.inferers import describe_inferer
from monai_nacl.temperature.record import save_calibrated
from monai_nacl.temperature.scaling import (
    TemperatureFitter,
    compose_temperature,
    weights_fingerprint,
)

__all__ = ["CalibratedModelSaver"]

logger = logging.getLogger(__name__)
_LOGITS_AND_LABELS = from_engine(["logits", "label_index"])


class CalibratedModelSaver:
    """Save the best network of a training run, by the evaluator's key metric, with its temperature(s) refitted
    on the validation pass that found it; never write weights whose temperature was fitted for other weights.

    Attach to the validation evaluator of a trainer, in place of MONAI's ``CheckpointSaver(save_key_metric=True)``.
    During each validation pass it samples voxel logits (as :class:`~monai_nacl.handlers.TemperatureFitHandler`
    does); when the key metric improves, it fits the temperature correction on them, writes the network's
    state_dict with the new total temperature to ``save_dir/filename`` and a provenance record beside it
    (:func:`~monai_nacl.temperature.save_calibrated`). The live network keeps its temperature, so every validation
    of a run is measured the same way.

    The best value so far is state (``state_dict``/``load_state_dict``): put the saver in the resume checkpoint's
    ``save_dict`` and a resumed run never replaces a better ``model.pt`` with a worse one.

    Args:
        save_dir: folder of the model (e.g. the bundle's ``models``).
        network: the trained :class:`~monai_nacl.temperature.TemperatureScaled` (or a DDP wrapper of it).
        num_classes: number of classes.
        output_transform: maps the evaluator's output to ``(logits, labels)``: the network output before softmax
            (at the network's current temperature) and the class-index labels.
        filename: model file name.
        metric_name: metric deciding "best" (default: the evaluator's key metric).
        higher_is_better: direction of ``metric_name``.
        **fitter_kwargs: passed to :class:`~monai_nacl.temperature.TemperatureFitter` (``foreground_margin``
            defaults to the network's).

    Raises:
        ValueError: ``network`` is not a ``TemperatureScaled``, or ``foreground_margin`` differs from it.
    """

    def __init__(
        self,
        save_dir: str | Path,
        network: torch.nn.Module,
        num_classes: int,
        output_transform: Callable = _LOGITS_AND_LABELS,
        filename: str = "model.pt",
        metric_name: str | None = None,
        higher_is_better: bool = True,
        **fitter_kwargs,
    ) -> None:
        module = (
            network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network
        )
        self.fitter = TemperatureFitter.for_network(module, num_classes, **fitter_kwargs)
        self.path = Path(save_dir) / filename
        self.network, self.output_transform = module, output_transform
        self.metric_name, self.higher_is_better = metric_name, bool(higher_is_better)
        self.best_metric: float | None = None
        self.best_epoch = 0

    def attach(self, engine: Engine) -> None:
        describe_inferer(getattr(engine, "inferer", None))  # refused now, not at the first best model mid-training
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.fitter.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._maybe_save)

    def check_saved(self) -> None:
        """Raise ``RuntimeError`` when no model was saved (on rank 0): no validation pass saw a case, or the key
        metric was NaN every time. The bundles call it after training, so such a run fails instead of ending
        with exit 0 and no model."""
        if idist.get_rank() == 0 and self.best_metric is None:
            raise RuntimeError(
                f"no model was saved to {self.path}: no validation pass produced a key metric (empty validation "
                "data, or a NaN metric every time, e.g. no foreground in any validation case)."
            )

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_metric = None if state.get("best_metric") is None else float(state["best_metric"])
        self.best_epoch = int(state.get("best_epoch", 0))

    def _collect(self, engine: Engine) -> None:
        self.fitter.update_batch(*self.output_transform(engine.state.output))

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.higher_is_better else value < self.best_metric

    def _maybe_save(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise ValueError(
                f"CalibratedModelSaver: metric {name!r} not in the evaluator's metrics {sorted(engine.state.metrics)}."
            )
        value, epoch = float(engine.state.metrics[name]), int(engine.state.epoch)
        if not self._improved(value):
            logger.info(
                "%s %.4f at epoch %d: best stays %s (epoch %d)", name, value, epoch, self.best_metric, self.best_epoch
            )
            return
        self.best_metric, self.best_epoch = value, epoch
        correction = self.fitter.fit()
        before, after = self.fitter.score(), self.fitter.score(correction)
        total = compose_temperature(self.network.temperature, correction)
        state = _snapshot(self.network.state_dict())
        state["temperature"] = total.to(state["temperature"].dtype)
        state["calibrated_for"] = torch.tensor(weights_fingerprint(state), dtype=torch.int64)
        provenance = {
            "fitted_by": "CalibratedModelSaver (best model of a training run)",
            "inferer": describe_inferer(getattr(engine, "inferer", None)),
            "epoch": epoch,
            "metric": {name: value},
            "foreground_margin": self.network.foreground_margin,
            "voxels": self.fitter.num_voxels,
            "sample_nll": {"before": before["nll"], "after": after["nll"]},
            "sample_ece": {"before": before["ece"], "after": after["ece"]},
            "validation": {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))},
        }
        if idist.get_rank() == 0:
            save_calibrated(state, self.path, **provenance)
        logger.info(
            "new best %s %.4f at epoch %d: wrote %s with temperature %s (sample ECE %.4f -> %.4f)",
            name,
            value,
            epoch,
            self.path,
            total.tolist(),
            before["ece"],
            after["ece"],
        )


def _snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state_dict that keeps its aliasing: entries that share memory (DynUNet registers every block twice,
    under ``skip_layers`` and under ``input_block``/``downsamples``/...) share one copy, so the file ``torch.save``
    writes holds each tensor once (a plain per-entry clone doubled DynUNet's weights file)."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, value in state.items():
        view = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape, value.stride(), value.dtype)
        if view not in copies:
            copies[view] = value.detach().clone()
        out[key] = copies[view]
    return out
