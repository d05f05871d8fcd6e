from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_prior
from ignite.engine import Engine, Events

from monai_nacl.handlers import ClassAdaptivePenalty, update_multipliers
from monai_nacl.handlers import adaptive_penalty as module
from monai_nacl.losses import DeepSupervisionLoss, HardL1ACELoss, NACLLoss

# ---------------------------------------------------------------- the update rule


def test_update_rule_hand_computed():
    lam = [0.1, 0.3, 0.5, 0.2, 0.4]
    g = [0.2, -0.4, 3.0, -1.0, float("nan")]
    new = update_multipliers(lam, g, rho=0.5, lambda_min=0.05, lambda_max=1.0)
    # 0.1 + 0.1; 0.3 - 0.2; 0.5 + 1.5 -> clipped to 1.0; 0.2 - 0.5 -> clipped to 0.05; NaN: unchanged
    assert new.tolist() == pytest.approx([0.2, 0.1, 1.0, 0.05, 0.4], abs=1e-15)
    assert new.dtype == torch.float64
    # without bounds it is the PHR step max(0, lam + rho g)
    assert update_multipliers([0.1, 0.1], [1.0, -1.0], rho=2.0).tolist() == pytest.approx([2.1, 0.0])
    assert update_multipliers(torch.tensor([0.5]), torch.tensor([0.0]), rho=7.0).tolist() == [0.5]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": 0.0}, "rho must be >"),
        ({"rho": -1.0}, "rho"),
        ({"rho": "0.1"}, "rho must be a real number"),
        ({"lambda_min": -0.1}, "lambda_min"),
        ({"lambda_min": 0.5, "lambda_max": 0.2}, "lambda_max must be >= 0.5"),
        ({"lambda_max": float("nan")}, "lambda_max must be finite"),
        ({"multipliers": [0.1]}, "same length"),
        ({"multipliers": [0.1, float("nan")]}, "multipliers must be finite"),
    ],
)
def test_update_rule_bad_arguments(kwargs, match):
    args = {"multipliers": [0.1, 0.2], "constraints": [0.0, 0.1], "rho": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        update_multipliers(**args)


# ---------------------------------------------------------------- statistics against brute force


def _batch(rng, b=2, c=3, shape=(5, 4, 6), scale=2.0):
    x = scale * torch.randn((b, c, *shape), generator=rng, dtype=torch.float64)
    y = torch.randint(0, c, (b, 1, *shape), generator=rng)
    return x, y


def _brute_force(batches, statistic, c, num_bins=15, distance="l1", penalty_on="logits", ignore_index=None):
    """Per-class statistics from explicit per-class, per-bin loops over all voxels of all batches."""
    num = torch.zeros(c, dtype=torch.float64)
    ece = torch.zeros(c, num_bins, 2, dtype=torch.float64)
    n = 0.0
    for x, y in batches:
        valid = torch.ones_like(y, dtype=torch.bool) if ignore_index is None else y != ignore_index
        n += float(valid.sum())
        p = F.softmax(x, 1)
        if statistic == "class_ece":
            for k in range(c):
                pk, hit = p[:, k : k + 1][valid], (y == k)[valid].double()
                for m in range(num_bins):
                    lo, hi = m / num_bins, (m + 1) / num_bins
                    inside = (pk >= lo) & ((pk < hi) if m < num_bins - 1 else (pk <= hi))
                    ece[k, m, 0] += pk[inside].sum()
                    ece[k, m, 1] += hit[inside].sum()
            continue
        tau = reference_prior(y, c, ignore_index=ignore_index)
        z = p if (statistic == "prior_gap" or penalty_on == "softmax") else x
        d = (z - tau).abs() if (statistic == "prior_gap" or distance == "l1") else (z - tau).square()
        for k in range(c):
            num[k] += d[:, k : k + 1][valid].sum()
    if statistic == "class_ece":
        return (ece[..., 0] - ece[..., 1]).abs().sum(1) / n
    return num / n


@pytest.mark.parametrize(
    "statistic, loss_kwargs",
    [
        ("penalty", {}),
        ("penalty", {"distance": "l2", "ignore_index": 9}),
        ("penalty", {"penalty_on": "softmax"}),
        ("prior_gap", {"distance": "l2"}),
        ("class_ece", {}),
        ("class_ece", {"ignore_index": 9}),
    ],
)
def test_statistic_accumulates_over_batches_like_brute_force(statistic, loss_kwargs, rng):
    loss = NACLLoss(3, **loss_kwargs)
    handler = ClassAdaptivePenalty(loss, margin=0.1, statistic=statistic, num_bins=7)
    batches = [_batch(rng), _batch(rng, b=1, shape=(3, 7, 4)), _batch(rng, b=3, shape=(4, 4, 4))]
    if "ignore_index" in loss_kwargs:
        batches[0][1][0, 0, 1] = 9
        batches[2][1][:, :, 0] = 9
    handler.update(*batches[0])
    handler.update([batches[1][0][0]], [batches[1][1][0]])  # a decollated list of one case (C,* and 1,*)
    handler.update(batches[2][0].float(), batches[2][1][:, 0])  # float32 logits, labels B,*spatial
    expected = _brute_force(
        [(batches[0][0], batches[0][1]), batches[1], (batches[2][0].float().double(), batches[2][1])],
        statistic,
        3,
        num_bins=7,
        distance=loss.distance,
        penalty_on=loss.penalty_on,
        ignore_index=loss.ignore_index,
    )
    torch.testing.assert_close(handler.compute(), expected, rtol=1e-5, atol=1e-7)
    handler.reset()
    assert torch.isnan(handler.compute()).all()


def test_given_prior_is_used_instead_of_the_loss_prior(rng):
    x, y = _batch(rng)
    loss = NACLLoss(3)  # 3x3x3 box
    wide = reference_prior(y, 3, kernel_size=5)
    own, given = ClassAdaptivePenalty(loss, margin=0.0), ClassAdaptivePenalty(loss, margin=0.0)
    own.update(x, y)
    given.update(x, y, wide)
    ref = ((x - wide).abs().sum(dim=[0, 2, 3, 4])) / y.numel()
    torch.testing.assert_close(given.compute(), ref)
    assert not torch.allclose(own.compute(), ref)


def test_sums_are_all_reduced_across_ranks(rng, monkeypatch):
    """Two simulated ranks with different data agree with one process that saw all of it."""
    loss = NACLLoss(3)
    rank0, rank1, single = (ClassAdaptivePenalty(loss, margin=0.1) for _ in range(3))
    a, b = _batch(rng), _batch(rng, b=1)
    rank0.update(*a)
    rank1.update(*b)
    single.update(*a)
    single.update(*b)
    other = torch.cat([rank1._sums.flatten(), rank1._count.view(1)])
    expected, alone = single.compute(), rank0.compute()
    assert not torch.allclose(alone, expected)
    calls = []

    def fake_all_reduce(t, op="SUM"):
        calls.append(t.shape)
        return t + other

    monkeypatch.setattr(module.idist, "get_world_size", lambda: 2)
    monkeypatch.setattr(module.idist, "all_reduce", fake_all_reduce)
    torch.testing.assert_close(rank0.compute(), expected)
    assert calls == [(4,)]  # one all-reduce of C sums + the voxel count
    assert rank0._count.item() == 240  # the local sums are left as they were


# ---------------------------------------------------------------- with ignite engines


def _volume(rng, n=3):
    x = torch.randn(n, 1, 6, 6, 6, generator=rng)
    y = (x > 0.3).long() + (x > 1.0).long()  # 3 classes from intensity
    return [(x[i : i + 1], y[i : i + 1]) for i in range(n)]


def test_trainer_and_evaluator_adapt_the_badly_calibrated_class(rng, caplog):
    """Class 2's validation logits are pushed 5 logits away from τ: its λ grows each round, the others relax to
    lambda_min and stay in bounds; the trainer's loss sees the new λ from the next epoch on."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    with torch.no_grad():
        net.weight.mul_(0.1)
    loss = NACLLoss(3, alpha=0.1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    seen: list[list[float]] = []

    def train_step(engine, batch):
        x, y = batch
        opt.zero_grad()
        value = loss(net(x), y)
        value.backward()
        opt.step()
        seen.append(loss.penalty_weight.tolist())
        return value.item()

    def val_step(engine, batch):
        x, y = batch
        with torch.no_grad():
            logits = net(x)
            logits[:, 2] += 5.0  # class 2 strays far from its neighbour prior
        return {"logits": logits, "label_index": y}

    trainer, evaluator = Engine(train_step), Engine(val_step)
    handler = ClassAdaptivePenalty(loss, margin=2.0, rho=0.1, lambda_min=0.02, lambda_max=0.6)
    handler.attach(evaluator)
    handler.attach(evaluator)  # attaching twice registers once
    val_data = _volume(rng)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run(val_data))
    with caplog.at_level(logging.INFO, logger=module.__name__):
        trainer.run(_volume(rng, 2), max_epochs=3)

    assert handler.rounds == 3
    lam = loss.penalty_weight
    assert lam[2] > 0.1 and lam[2] <= 0.6  # violated: raised (within the upper bound)
    assert lam[0] < 0.1 and lam[1] < 0.1 and bool((lam[:2] >= 0.02).all())  # satisfied: relaxed, in bounds
    stat = handler.last_statistic
    assert stat[2] > 2.0 > float(stat[:2].max())
    # each epoch of the trainer used the λ of the previous validation round
    assert seen[0] == seen[1] == [0.1, 0.1, 0.1]
    assert seen[2] == seen[3] != seen[1]
    assert seen[3][2] > seen[1][2]
    assert evaluator.state.metrics["adaptive_penalty_lambda_2"] == pytest.approx(float(lam[2]))
    assert evaluator.state.metrics["adaptive_penalty_stat_2"] == pytest.approx(float(stat[2]))
    assert sum("penalty_weight" in r.getMessage() for r in caplog.records) == 3
    assert len(evaluator._event_handlers[Events.EPOCH_COMPLETED]) == 1


def test_class_ece_statistic_on_an_evaluator_round(rng):
    """Class 0 predicted correctly (calibrated), half of class 1 confidently predicted as class 2."""
    loss = NACLLoss(3, alpha=0.2)
    handler = ClassAdaptivePenalty(loss, margin=0.02, rho=1.0, lambda_min=0.05, lambda_max=0.5, statistic="class_ece")
    data = []
    for _ in range(3):
        y = torch.randint(0, 3, (1, 1, 6, 6, 6), generator=rng)
        pred = torch.where((y == 1) & (torch.rand(y.shape, generator=rng) < 0.5), 2, y)
        data.append({"logits": 12.0 * F.one_hot(pred[:, 0], 3).movedim(-1, 1).double(), "label_index": y})
    evaluator = Engine(lambda e, b: b)
    handler.attach(evaluator)
    evaluator.run(data)
    stat, lam = handler.last_statistic, loss.penalty_weight
    # class 2: the moved voxels sit in the top bin with no hit; class 1: they sit in the bottom bin, all hits
    moved = sum(int(((d["label_index"] == 1) & (d["logits"].argmax(1, keepdim=True) == 2)).sum()) for d in data)
    gap = moved / (3 * 6**3)
    assert moved > 0 and float(stat[0]) < 1e-4
    assert stat[1:].tolist() == pytest.approx([gap, gap], abs=1e-4)
    # the miscalibrated classes' λ grow (clipped at lambda_max), the calibrated class relaxes (not below lambda_min)
    step = min(0.2 + gap - 0.02, 0.5)
    assert lam.tolist() == pytest.approx([0.18, step, step], abs=1e-4)
    assert float(lam[1]) > 0.2 and float(lam[2]) > 0.2 and 0.05 <= float(lam[0]) < 0.2


def test_state_dict_round_trip_and_monai_checkpoint(tmp_path):
    from monai.handlers import CheckpointLoader, CheckpointSaver

    loss = NACLLoss(3, alpha=0.1)
    handler = ClassAdaptivePenalty(loss, margin=0.5, rho=0.1)
    handler.step([0.5, 2.5, 0.0])
    state = handler.state_dict()
    assert state["penalty_weight"] == pytest.approx([0.1, 0.3, 0.05]) and state["rounds"] == 1

    fresh_loss = NACLLoss(3, alpha=0.1)
    fresh = ClassAdaptivePenalty(fresh_loss, margin=0.5, rho=0.1)
    fresh.load_state_dict(state)
    assert fresh_loss.penalty_weight.tolist() == handler.penalty_weight.tolist()
    assert fresh.rounds == 1 and fresh.last_statistic.tolist() == [0.5, 2.5, 0.0]

    engine = Engine(lambda e, b: None)
    CheckpointSaver(
        str(tmp_path),
        {"adaptive_penalty": handler, "other": torch.nn.Linear(1, 1)},
        save_final=True,
        final_filename="final.pt",
    ).attach(engine)
    engine.run([0], max_epochs=1)
    resumed_loss = NACLLoss(3, alpha=0.1)
    resumed = ClassAdaptivePenalty(resumed_loss, margin=0.5, rho=0.1)
    assert resumed_loss.penalty_weight.tolist() == [0.1, 0.1, 0.1]
    loader_engine = Engine(lambda e, b: None)
    CheckpointLoader(str(tmp_path / "final.pt"), {"adaptive_penalty": resumed, "other": torch.nn.Linear(1, 1)}).attach(
        loader_engine
    )
    loader_engine.run([0], max_epochs=1)
    assert resumed_loss.penalty_weight.tolist() == handler.penalty_weight.tolist()
    # the next round continues from the restored λ
    assert resumed.step([0.5, 0.5, 0.5]).tolist() == pytest.approx(handler.penalty_weight.tolist())
    assert resumed.rounds == 2


def test_initial_weights_wrappers_and_disabled():
    inner = NACLLoss(4, alpha=0.3)
    handler = ClassAdaptivePenalty(DeepSupervisionLoss(DeepSupervisionLoss(inner)), margin=[0.1, 0.2, 0.3, 0.4])
    assert handler.target is inner and inner.penalty_weight.tolist() == [0.3] * 4
    assert handler.margin.tolist() == [0.1, 0.2, 0.3, 0.4]
    inner.penalty_weight = [0.1, 0.2, 0.3, 0.4]
    assert ClassAdaptivePenalty(inner, margin=0.1).penalty_weight.tolist() == [0.1, 0.2, 0.3, 0.4]
    explicit = NACLLoss(3)
    ClassAdaptivePenalty(explicit, margin=0.1, lambda_init=[0.0, 0.5, 1.0])
    assert explicit.penalty_weight.tolist() == [0.0, 0.5, 1.0]
    off_loss = NACLLoss(3)
    off = ClassAdaptivePenalty(off_loss, margin=0.1, lambda_init=0.5, enabled=False)
    engine = Engine(lambda e, b: {"logits": torch.zeros(1, 3, 2, 2, 2), "label_index": torch.zeros(1, 1, 2, 2, 2)})
    off.attach(engine)
    engine.run([0], max_epochs=1)
    assert off_loss.penalty_weight is None and off.rounds == 0 and not engine.has_event_handler(off._completed)


def test_empty_round_keeps_the_weights(caplog):
    loss = NACLLoss(3, ignore_index=255)
    handler = ClassAdaptivePenalty(loss, margin=0.1)
    y = torch.full((1, 1, 3, 3, 3), 255)
    evaluator = Engine(lambda e, b: {"logits": torch.randn(1, 3, 3, 3, 3), "label_index": y})
    handler.attach(evaluator)
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        evaluator.run([0], max_epochs=1)
    assert loss.penalty_weight.tolist() == [0.1] * 3 and handler.rounds == 1
    assert "no valid voxel" in caplog.text
    assert all(math.isnan(v) for v in handler.last_statistic.tolist())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"statistic": "ece"}, "statistic must be one of"),
        ({"margin": -0.1}, "margin must be >= 0"),
        ({"margin": [0.1, 0.2]}, "margin must hold 3 values"),
        ({"margin": "0.1"}, "margin must be a real number"),
        ({"rho": 0}, "rho must be > 0"),
        ({"lambda_min": -1.0}, "lambda_min"),
        ({"lambda_min": 0.5, "lambda_max": 0.1}, "lambda_max must be >= 0.5"),
        ({"lambda_init": 2.0}, "lambda_init must lie in"),
        ({"lambda_init": [0.1, float("nan"), 0.1]}, "lambda_init must hold 3 finite"),
        ({"num_bins": 0}, "num_bins must be >= 1"),
        ({"num_bins": 2.0}, "num_bins must be an integer"),
        ({"output_transform": "logits"}, "output_transform must be callable"),
        ({"name": 3}, "name must be a string"),
        ({"prior_key": 3}, "prior_key must be a string"),
        ({"enabled": "no"}, "enabled must be true or false"),  # a truthy string would have left it on
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"margin": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        ClassAdaptivePenalty(NACLLoss(3), **args)


def test_bad_loss_state_and_outputs(rng, caplog):
    with pytest.raises(ValueError, match="no per-class penalty_weight"):
        ClassAdaptivePenalty(HardL1ACELoss(3), margin=0.1)
    with pytest.raises(ValueError, match="no per-class penalty_weight"):
        ClassAdaptivePenalty(DeepSupervisionLoss(HardL1ACELoss(3)), margin=0.1)
    with pytest.raises(ValueError, match="lambda_init must lie in"):  # the loss's alpha is above lambda_max
        ClassAdaptivePenalty(NACLLoss(3, alpha=2.0), margin=0.1)
    handler = ClassAdaptivePenalty(NACLLoss(3), margin=0.1)
    with pytest.raises(ValueError, match="state\\['penalty_weight'\\] must hold 3"):
        handler.load_state_dict({"penalty_weight": [0.1, 0.2]})
    with pytest.raises(ValueError, match="state must be a dict with 'penalty_weight'"):
        handler.load_state_dict({"lambda": [0.1, 0.2, 0.3]})
    # a checkpoint from before lambda_max was lowered: clipped at once (not used until the next round), and said
    clipped = ClassAdaptivePenalty(NACLLoss(3), margin=0.1)
    with caplog.at_level("WARNING", logger="monai_nacl.handlers.adaptive_penalty"):
        clipped.load_state_dict({"penalty_weight": [5.0, 0.5, 5.0]})
    assert clipped.penalty_weight.tolist() == [1.0, 0.5, 1.0] == clipped.target.penalty_weight.tolist()
    assert "outside [lambda_min, lambda_max] = [0.0, 1.0]" in caplog.text
    # a round that saw no voxel saves a NaN statistic: its checkpoint resumes
    clipped.step([float("nan")] * 3)
    clipped.load_state_dict(clipped.state_dict())
    assert clipped.last_statistic.isnan().all()
    with pytest.raises(ValueError, match="state\\['rounds'\\] must be an integer"):
        handler.load_state_dict({"penalty_weight": [0.1, 0.2, 0.3], "rounds": "x"})
    with pytest.raises(ValueError, match="state\\['last_statistic'\\] must hold 3 values"):
        handler.load_state_dict({"penalty_weight": [0.1, 0.2, 0.3], "last_statistic": [0.1]})
    assert handler.penalty_weight.tolist() == [0.1] * 3 and handler.rounds == 0  # nothing half-loaded
    with pytest.raises(ValueError, match="statistic must hold 3 values"):
        handler.step([0.1])
    with pytest.raises(ValueError, match="statistic must be numbers, got 'abc'"):
        handler.step("abc")
    with pytest.raises(ValueError, match="multipliers must be numbers"):
        update_multipliers(["a"], [0.1], rho=0.1)
    # 0-d tensors read like the numbers they hold
    zero_d = ClassAdaptivePenalty(NACLLoss(3), margin=torch.tensor(0.5), lambda_max=torch.tensor(float("inf")))
    assert zero_d.margin.tolist() == [0.5] * 3 and zero_d.lambda_max == float("inf")
    x, y = _batch(rng)
    with pytest.raises(ValueError, match="logits has 2 channels|channels"):
        handler.update(x[:, :2], y)
    with pytest.raises(ValueError, match="outside"):
        handler.update(x, y + 5)
    with pytest.raises(ValueError, match="target must be a torch.Tensor, got ndarray"):
        handler.update(x, y.numpy())
    with pytest.raises(ValueError, match="prior shape"):
        handler.update(x, y, torch.zeros(2, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="same length"):
        handler.update([x[0], x[1]], [y[0]])
    with pytest.raises(ValueError, match="non-finite logits"):
        handler.update(x.index_fill(2, torch.tensor([1]), float("nan")), y)
    with pytest.raises(ValueError, match="non-finite prior|prior contains NaN"):
        handler.update(x, y, reference_prior(y, 3).index_fill(3, torch.tensor([2]), float("nan")))
    assert handler._count.item() == 0  # a rejected batch adds nothing
    engine = Engine(lambda e, b: {"logits": x, "label_index": y})
    bad = ClassAdaptivePenalty(NACLLoss(3), margin=0.1, output_transform=lambda out: out["logits"])
    bad.attach(engine)
    with pytest.raises(ValueError, match="must return \\(logits, labels\\)"):
        engine.run([0], max_epochs=1)


def test_bundle_style_construction():
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "imports": ["$import monai"],
            "loss": {"_target_": "monai_nacl.losses.NACLLoss", "num_classes": 3, "alpha": 0.1},
            "adaptive_penalty": {
                "_target_": "monai_nacl.handlers.ClassAdaptivePenalty",
                "loss": "@loss",
                "margin": 0.5,
                "rho": 0.05,
                "lambda_max": 1.0,
                "output_transform": "$monai.handlers.from_engine(['logits', 'label_index'])",
            },
        }
    )
    handler = parser.get_parsed_content("adaptive_penalty")
    assert handler.target is parser.get_parsed_content("loss")
    assert handler.target.penalty_weight.tolist() == [0.1, 0.1, 0.1]


def test_monai_supervised_evaluator_with_the_prior_from_the_batch(rng):
    """A MONAI evaluator as in the bundles: decollated outputs, logits copied before softmax, τ from the batch."""
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator
    from monai.transforms import Activationsd, Compose, CopyItemsd

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1).double()
    cases = []
    for _ in range(3):
        image = torch.randn(1, 6, 5, 4, generator=rng, dtype=torch.float64)
        label = (image > 0).long() + (image > 1).long()
        cases.append({"image": image, "label": label, "prior": reference_prior(label[None], 3, kernel_size=5)[0]})
    post = Compose(
        [
            CopyItemsd(keys="pred", names="logits"),
            CopyItemsd(keys="label", names="label_index"),
            Activationsd(keys="pred", softmax=True),
        ]
    )
    loss = NACLLoss(3, alpha=0.1)  # its own kernel is 3x3x3: the 5x5x5 prior must come from the batch
    handler = ClassAdaptivePenalty(loss, margin=0.0, rho=0.01, prior_key="prior", name="ap")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(cases, batch_size=2),
        network=net,
        postprocessing=post,
        val_handlers=[handler],
    )
    evaluator.run()
    with torch.no_grad():
        x = net(torch.stack([c["image"] for c in cases]))
    tau = torch.stack([c["prior"] for c in cases])
    expected = (x - tau).abs().sum(dim=[0, 2, 3, 4]) / (3 * 6 * 5 * 4)
    torch.testing.assert_close(handler.last_statistic, expected)
    torch.testing.assert_close(loss.penalty_weight, 0.1 + 0.01 * expected)
    assert evaluator.state.metrics["ap_lambda_0"] == pytest.approx(0.1 + 0.01 * float(expected[0]))
    missing = ClassAdaptivePenalty(NACLLoss(3), margin=0.0, prior_key="tau")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(cases, batch_size=2),
        network=net,
        postprocessing=post,
        val_handlers=[missing],
    )
    with pytest.raises(KeyError, match="the batch has no 'tau'"):
        evaluator.run()
