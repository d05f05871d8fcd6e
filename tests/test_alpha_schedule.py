from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

from monai_nacl.handlers import AlphaSchedule
from monai_nacl.losses import DeepSupervisionLoss, HardL1ACELoss, NACLLoss


def _run(sched: AlphaSchedule, epochs: int, engine: Engine | None = None) -> tuple[Engine, list[float]]:
    """Run a bare engine (2 iterations per epoch) and record the loss's alpha at every iteration."""
    seen: list[float] = []
    engine = engine or Engine(lambda e, b: seen.append(sched.target.alpha))
    sched.attach(engine)
    engine.run([0, 1], max_epochs=epochs)
    return engine, seen


def test_linear_with_warmup_on_an_engine():
    loss = NACLLoss(3, alpha=0.5)
    sched = AlphaSchedule(loss, "linear", start_alpha=0.0, end_alpha=0.2, warmup_epochs=2, ramp_epochs=4)
    _, seen = _run(sched, 8)
    per_epoch = seen[::2]
    assert seen[::2] == seen[1::2], "alpha is constant within an epoch"
    assert per_epoch == pytest.approx([0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert loss.alpha == pytest.approx(0.2) and sched.last_alpha == pytest.approx(0.2)


def test_cosine_and_step_values():
    loss = NACLLoss(3)
    cos = AlphaSchedule(loss, "cosine", start_alpha=1.0, end_alpha=0.0, warmup_epochs=1, ramp_epochs=4)
    expected = [1.0, 1.0] + [(1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4)] + [0.0]
    assert [cos.value(e) for e in range(7)] == pytest.approx(expected)
    step = AlphaSchedule(loss, "step", start_alpha=0.0, end_alpha=0.3, warmup_epochs=0, ramp_epochs=6, num_steps=3)
    assert [step.value(e) for e in range(8)] == pytest.approx([0, 0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3])
    single = AlphaSchedule(loss, "step", start_alpha=0.0, end_alpha=0.3, warmup_epochs=2, ramp_epochs=3)
    assert [single.value(e) for e in range(7)] == pytest.approx([0, 0, 0, 0, 0, 0.3, 0.3])
    jump = AlphaSchedule(loss, "linear", start_alpha=0.0, end_alpha=0.3, warmup_epochs=2, ramp_epochs=0)
    assert [jump.value(e) for e in range(4)] == pytest.approx([0, 0, 0.3, 0.3])


def test_alpha_changes_the_loss_value():
    torch.manual_seed(0)
    x, y = torch.randn(1, 3, 6, 6, 6), torch.randint(0, 3, (1, 1, 6, 6, 6))
    loss = NACLLoss(3, alpha=0.0)
    ce_only = loss(x, y).item()
    sched = AlphaSchedule(loss, "linear", start_alpha=0.0, end_alpha=0.2, ramp_epochs=1)
    _run(sched, 2)
    assert loss.alpha == pytest.approx(0.2)
    assert loss(x, y).item() == pytest.approx(ce_only + 0.2 * loss.last_components["penalty"].item(), rel=1e-5)


def test_deep_supervision_wrapper_and_nesting():
    inner = NACLLoss(3, alpha=0.7)
    wrapped = DeepSupervisionLoss(DeepSupervisionLoss(inner))
    sched = AlphaSchedule(wrapped, "linear", start_alpha=0.0, end_alpha=0.4, ramp_epochs=2)
    assert sched.target is inner
    _run(sched, 2)
    assert inner.alpha == pytest.approx(0.2)


def test_resume_continues_the_schedule():
    """The value derives from engine.state.epoch: a restored engine resumes mid-ramp with no state of its own."""
    loss = NACLLoss(3)
    kw = dict(schedule="linear", start_alpha=0.0, end_alpha=1.0, warmup_epochs=1, ramp_epochs=4)
    engine, first = _run(AlphaSchedule(loss, **kw), 3)
    state = engine.state_dict()
    loss.alpha = 123.0  # a fresh process: the loss starts from its config value
    seen: list[float] = []
    resumed = Engine(lambda e, b: seen.append(loss.alpha))
    resumed.load_state_dict(state)
    sched = AlphaSchedule(loss, **kw)
    sched.attach(resumed)
    resumed.run([0, 1], max_epochs=6)
    assert first[::2] == pytest.approx([0.0, 0.0, 0.25])
    assert seen[::2] == pytest.approx([0.5, 0.75, 1.0])


def test_attach_twice_registers_once_and_disabled_is_a_no_op():
    loss = NACLLoss(3, alpha=0.9)
    sched = AlphaSchedule(loss, end_alpha=0.1)
    engine = Engine(lambda e, b: None)
    sched.attach(engine)
    sched.attach(engine)
    assert len(engine._event_handlers[Events.EPOCH_STARTED]) == 1
    off = AlphaSchedule(HardL1ACELoss(3), enabled=False)  # no alpha needed when disabled
    engine = Engine(lambda e, b: None)
    off.attach(engine)
    engine.run([0], max_epochs=1)
    assert off.last_alpha is None and not engine.has_event_handler(off)


def test_bad_arguments():
    loss = NACLLoss(3)
    with pytest.raises(ValueError, match="schedule"):
        AlphaSchedule(loss, "exponential")
    with pytest.raises(ValueError, match="start_alpha"):
        AlphaSchedule(loss, start_alpha=-0.1)
    with pytest.raises(ValueError, match="end_alpha"):
        AlphaSchedule(loss, end_alpha=float("inf"))
    with pytest.raises(ValueError, match="end_alpha"):
        AlphaSchedule(loss, end_alpha="0.1")
    with pytest.raises(ValueError, match="warmup_epochs"):
        AlphaSchedule(loss, warmup_epochs=-1)
    with pytest.raises(ValueError, match="ramp_epochs"):
        AlphaSchedule(loss, ramp_epochs=2.5)
    with pytest.raises(ValueError, match="num_steps"):
        AlphaSchedule(loss, "step", num_steps=0)
    with pytest.raises(ValueError, match="no float alpha"):
        AlphaSchedule(HardL1ACELoss(3))
    with pytest.raises(ValueError, match="no float alpha"):
        AlphaSchedule(DeepSupervisionLoss(HardL1ACELoss(3)))
    with pytest.raises(ValueError, match="enabled must be true or false"):
        AlphaSchedule(loss, enabled="false")  # a truthy string would have left the schedule on


def test_refuses_a_loss_whose_alpha_is_replaced_by_per_class_weights():
    """Per-class penalty weights replace alpha: scheduling alpha would change nothing, silently."""
    from monai_nacl.handlers import ClassAdaptivePenalty

    with pytest.raises(ValueError, match="per-class penalty weights set"):
        AlphaSchedule(NACLLoss(3, penalty_weight=[0.1, 0.2, 0.2]), end_alpha=5.0)
    loss = NACLLoss(3)
    schedule = AlphaSchedule(loss, end_alpha=5.0, ramp_epochs=1)  # built first: checked when an epoch starts
    ClassAdaptivePenalty(loss, margin=0.1)
    with pytest.raises(ValueError, match="per-class penalty weights set"):
        _run(schedule, 1)


def test_bundle_style_construction():
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "loss": {"_target_": "monai_nacl.losses.NACLLoss", "num_classes": 3},
            "sched": {
                "_target_": "monai_nacl.handlers.AlphaSchedule",
                "loss": "@loss",
                "schedule": "cosine",
                "start_alpha": 0.0,
                "end_alpha": 0.1,
                "warmup_epochs": 1,
                "ramp_epochs": 2,
            },
        }
    )
    sched = parser.get_parsed_content("sched")
    assert sched.target is parser.get_parsed_content("loss")
    assert sched.value(2) == pytest.approx(0.05)
