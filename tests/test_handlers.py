from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import MetricsSaver, StatsHandler, from_engine
from monai.networks.nets import UNet
from monai.transforms import Activationsd, Compose, CopyItemsd

from monai_nacl.handlers import CalibrationHandler, ReliabilityDiagramHandler, TemperatureFitHandler
from monai_nacl.metrics import CalibrationMetric
from monai_nacl.temperature import TemperatureScaled


def _data(n=3):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        label = torch.zeros(1, 16, 16, 16)
        label[:, 4:12, 4:12, 4:12] = 1
        label[:, 6:10, 6:10, 8:12] = 2
        image = label / 2 + 0.3 * torch.randn(label.shape, generator=g)
        meta = {"filename_or_obj": f"case_{i:03d}.nii.gz"}
        items.append({"image": MetaTensor(image, meta=meta), "label": MetaTensor(label, meta=dict(meta))})
    return items


def test_evaluator_with_all_handlers(tmp_path, caplog):
    torch.manual_seed(0)
    net = TemperatureScaled(UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1))
    post = Compose([CopyItemsd("pred", names="logits"), Activationsd("pred", softmax=True)])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(_data()), batch_size=2),
        network=net,
        postprocessing=post,
    )
    calib = CalibrationHandler(3, mask="all", output_transform=from_engine(["pred", "label"]))
    calib.attach(evaluator, "val")
    StatsHandler(iteration_log=False, name="eval", tag_name="val").attach(evaluator)
    ReliabilityDiagramHandler(calib, tmp_path / "figs", class_names=["bg", "a", "b"]).attach(evaluator)
    fit = TemperatureFitHandler(
        net, 3, output_transform=from_engine(["logits", "label"]), save_path=tmp_path / "model.pt"
    )
    fit.attach(evaluator)
    MetricsSaver(
        save_dir=str(tmp_path / "csv"),
        metrics=["val_ece"],
        metric_details=["val_ece", "val_nll"],
        batch_transform=lambda batch: [item["image"].meta for item in batch],
        summary_ops=None,
    ).attach(evaluator)
    with caplog.at_level(logging.INFO):
        evaluator.run()

    metrics = evaluator.state.metrics
    for key in ("val_ece", "val_ace", "val_mce", "val_cece", "val_nll", "val_brier", "val_n_volumes"):
        assert key in metrics
    assert metrics["val_n_volumes"] == 3
    # the handler's value equals the metric run directly on the same probabilities
    direct = CalibrationMetric(3)
    with torch.no_grad():
        for item in _data():
            direct(torch.softmax(net.network(item["image"][None]), 1), item["label"][None])
    assert abs(metrics["val_ece"] - direct.aggregate()["ece"]) < 1e-6

    payload = json.loads((tmp_path / "figs" / "reliability.json").read_text())
    assert payload["metrics"]["ece"] == metrics["val_ece"]
    assert sum(payload["bins"]["top_label"]["count"]) == 3 * 16**3
    assert (tmp_path / "figs" / "reliability.png").stat().st_size > 10_000

    rows = list(csv.reader(open(tmp_path / "csv" / "val_ece_raw.csv")))
    assert [r[0] for r in rows[1:]] == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    assert sum(float(r[1]) for r in rows[1:]) / 3 == pytest.approx(metrics["val_ece"], abs=1e-6)

    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["temperature"].item() == fit.fitted.item() != 1.0
    assert "temperature" in metrics


def _toy_run(save_dir, max_epochs, kill_at=None, t_max=None):
    from ignite.engine import Engine, Events

    from monai_nacl.handlers import ResumableCheckpoint

    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max or max_epochs)
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: sched.step())
    ResumableCheckpoint(save_dir, {"network": net, "optimizer": opt, "lr_scheduler": sched}).attach(engine)
    if kill_at is not None:

        def kill(e):
            raise KeyboardInterrupt

        engine.add_event_handler(Events.EPOCH_STARTED(once=kill_at), kill)
    return engine, sched


def test_resumable_checkpoint_keeps_the_configured_schedule_length(tmp_path):
    engine, _ = _toy_run(tmp_path, max_epochs=4, kill_at=3)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=4)
    # extend the interrupted run: the schedule follows the new length instead of the checkpoint's T_max=4
    engine, sched = _toy_run(tmp_path, max_epochs=8, t_max=8)
    seen = []
    from ignite.engine import Events

    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append((e.state.epoch, sched.T_max)))
    engine.run([0], max_epochs=8)
    assert seen[0] == (3, 8) and len(seen) == 6
    assert not list(tmp_path.glob("*.pt"))  # completed: removed


def test_resumable_checkpoint_names_a_corrupt_file(tmp_path):
    (tmp_path / "train_checkpoint_3.pt").write_bytes(b"truncated")
    engine, _ = _toy_run(tmp_path, max_epochs=4)
    with pytest.raises(ValueError, match="cannot resume from .*train_checkpoint_3.pt .*delete it"):
        engine.run([0], max_epochs=4)


def test_interval_validation_includes_the_last_epoch():
    from ignite.engine import Engine

    from monai_nacl.handlers import IntervalValidationHandler

    handler = IntervalValidationHandler(interval=5)
    calls = []
    engine = Engine(lambda e, b: None)
    handler.validator = type("V", (), {"run": lambda self, epoch: calls.append(epoch)})()
    handler.attach(engine)
    engine.run([0], max_epochs=12)
    assert calls == [5, 10, 12]
    with pytest.raises(ValueError, match="positive integer"):
        IntervalValidationHandler(interval=0)


def test_interval_validation_of_a_calibrated_start():
    from ignite.engine import Engine

    from monai_nacl.handlers import IntervalValidationHandler

    net = TemperatureScaled(UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1))
    calls = []
    validator = type("V", (), {"network": net, "run": lambda self, epoch: calls.append(epoch)})()

    def run():
        calls.clear()
        engine = Engine(lambda e, b: None)
        handler = IntervalValidationHandler(interval=5)
        handler.validator = validator  # a stand-in for an Evaluator (MONAI's setter checks the type)
        handler.attach(engine)
        engine.run([0], max_epochs=2)
        return list(calls)

    assert run() == [2]  # a fresh network: nothing to compare against
    net.set_temperature(1.5)  # calibrated for these weights, as a model.pt loaded for fine-tuning
    assert run() == [0, 2]
    with torch.no_grad():
        next(net.network.parameters()).add_(1.0)  # weights changed since (a resumed run)
    assert run() == [2]


# --- atomic saving ------------------------------------------------------------------------------------------------


def _state():
    net = TemperatureScaled(torch.nn.Conv3d(1, 2, 1))
    net.set_temperature(1.5)
    return net.state_dict()


def _fail_midway(obj, f, **kwargs):
    with open(f, "wb") as out:
        out.write(b"half a checkpoint")
    raise OSError("disk full")


def test_atomic_save_keeps_the_previous_file_when_a_save_fails(tmp_path, monkeypatch):
    """monai.networks.utils.save_state(atomic=True) deletes the existing file before writing; ours must not."""
    import os
    import stat

    from monai_nacl.handlers import atomic_save
    from monai_nacl.temperature import read_calibration_record
    from monai_nacl.temperature.record import save_calibrated

    path = atomic_save({"a": torch.ones(2)}, tmp_path / "sub" / "obj.pt")
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # what a plain torch.save gives, not mkstemp's 0600

    first = save_calibrated(_state(), tmp_path / "model.pt", epoch=1)
    before = (tmp_path / "model.pt").read_bytes()
    monkeypatch.setattr(torch, "save", _fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_calibrated(_state(), tmp_path / "model.pt", epoch=2)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"b": 1}, path)
    assert (tmp_path / "model.pt").read_bytes() == before
    assert read_calibration_record(tmp_path / "model.pt") == first
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["model.calibration.json", "model.pt", "obj.pt", "sub"]


# --- distributed per-case details ---------------------------------------------------------------------------------


def _details_worker(rank, port, probs, labels, out):
    import torch.distributed as dist
    from ignite.engine import Engine

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    handler = CalibrationHandler(3, mask="all")
    mine = slice(0, 3) if rank == 0 else slice(3, 4)  # uneven: the gather pads and trims
    handler.update((probs[mine], labels[mine]))
    engine = Engine(lambda e, b: None)
    handler.completed(engine, "val")
    out[rank] = engine.state.metric_details["val_ece"].flatten().tolist()
    dist.destroy_process_group()


@pytest.mark.slow  # two processes (about 20 s on two busy cores)
def test_calibration_handler_gathers_per_case_values_across_ranks():
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 3, 5, 5, 5, generator=g), 1)
    labels = torch.randint(0, 3, (4, 1, 5, 5, 5), generator=g)
    single = CalibrationMetric(3, mask="all", per_volume=True)
    single(probs, labels)
    expected = [v["ece"] for v in single.get_per_volume()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_details_worker, args=(port, probs, labels, out), nprocs=2, join=True)
    for rank in range(2):
        assert out[rank] == pytest.approx(expected)


def test_calibration_handler_adaptive_binning_matches_the_metric():
    from ignite.engine import Engine

    torch.manual_seed(1)
    batches = [
        (torch.softmax(torch.randn(2, 3, 6, 6, 6) * 3, 1), torch.randint(0, 3, (2, 1, 6, 6, 6))) for _ in range(2)
    ]
    engine = Engine(lambda e, b: b)
    handler = CalibrationHandler(3, mask="all", binning="adaptive")
    handler.attach(engine, "val")
    engine.run(batches, max_epochs=1)
    direct = CalibrationMetric(3, mask="all", binning="adaptive")
    for probs, labels in batches:
        direct(probs, labels)
    expected = direct.aggregate()
    assert engine.state.metrics["val_ece"] == pytest.approx(expected["ece"], abs=1e-9)
    assert "val_ece_bound" in engine.state.metrics
    uniform = CalibrationMetric(3, mask="all")
    for probs, labels in batches:
        uniform(probs, labels)
    assert engine.state.metrics["val_ece"] != pytest.approx(uniform.aggregate()["ece"], abs=1e-6)
    with pytest.raises(ValueError, match="binning"):
        CalibrationHandler(3, binning="quantile")
