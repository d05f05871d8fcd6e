"""All bundles come from one template plus a small override each (tools/make_bundles.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from monai_nacl.bundle_check import all_bundles

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_bundles", ROOT / "tools" / "make_bundles.py")
make_bundles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_bundles)


def test_generated_bundles_match_their_template():
    assert make_bundles.main(["--check"]) == 0, "run: python tools/make_bundles.py"


def test_every_bundle_is_generated_from_the_template():
    assert sorted(b.name for b in all_bundles()) == make_bundles.bundle_names()


@pytest.mark.parametrize("name", make_bundles.bundle_names())
def test_merge_is_what_monai_does_with_the_two_files(name):
    for src in sorted(make_bundles.BASE.glob("*.json")):
        override = make_bundles.OVERRIDES / name / "configs" / src.name
        base = json.loads(src.read_text())
        if not override.is_file() or src.name in make_bundles.NO_NOTE or make_bundles.is_overlay(base):
            continue
        generated = json.loads((ROOT / "bundles" / name / "configs" / src.name).read_text())
        generated.pop("_generated_from_")
        assert generated == ConfigParser.load_config_files([str(src), str(override)]), f"{name}: {src.name}"


def test_no_config_addresses_a_list_position():
    # overrides and the bundles' own overlay files (train_dice_ce.json, multi_gpu_train.json, ...)
    files = list(make_bundles.OVERRIDES.glob("*/configs/*.json")) + list(ROOT.glob("bundles/*/configs/*.json"))
    assert len(files) > 60
    for path in files:
        make_bundles.check_ids(json.loads(path.read_text()), str(path))


def test_positional_ids_are_refused():
    with pytest.raises(ValueError, match=r"train#handlers#0.*list position"):
        make_bundles.check_ids({"train#handlers#0": {}}, "x.json")
    with pytest.raises(ValueError, match="list position"):
        make_bundles.check_ids({"+train::random_transforms::-1": {}}, "x.json")
    make_bundles.check_ids({"train#handlers": [], "network_def#network#in_channels": 2}, "x.json")


def test_a_missing_required_value_names_the_bundle_and_the_id(tmp_path, monkeypatch):
    base = tmp_path / "base" / "configs"
    base.mkdir(parents=True)
    (base / "train.json").write_text(json.dumps({"num_classes": "<required>", "net": {"in_channels": "<required>"}}))
    over = tmp_path / "bundles" / "demo" / "configs"
    over.mkdir(parents=True)
    (over / "train.json").write_text(json.dumps({"num_classes": 3}))
    monkeypatch.setattr(make_bundles, "BASE", base)
    monkeypatch.setattr(make_bundles, "OVERRIDES", tmp_path / "bundles")
    monkeypatch.setattr(make_bundles, "ROOT", tmp_path)
    with pytest.raises(ValueError, match=r"bundle demo: configs/train.json still needs a value for net#in_channels"):
        make_bundles.render("demo")
    (over / "train.json").write_text(json.dumps({"num_classes": 3, "net#in_channels": 1}))
    out = json.loads(make_bundles.render("demo")["configs/train.json"])
    assert out["net"] == {"in_channels": 1} and out["num_classes"] == 3
    assert "templates/bundles/demo/configs/train.json" in out["_generated_from_"]


def test_overlay_configs_merge_key_by_key():
    base = {"validate#handlers": [1], "run": ["a"]}
    merged = make_bundles.merge(base, {"validate#handlers": [2], "validate#dataset#data": "x"})
    assert merged == {"validate#handlers": [2], "run": ["a"], "validate#dataset#data": "x"}
    assert list(merged) == ["validate#handlers", "run", "validate#dataset#data"]  # MONAI applies them in order


def test_every_import_of_a_config_is_used_and_every_module_used_is_imported():
    # torch, numpy and monai are ConfigParser's defaults; these are the other modules bundle expressions may use
    optional = ("glob", "os", "ignite", "json", "math", "monai_nacl")
    for path in sorted(ROOT.glob("bundles/*/configs/*.json")):
        config = json.loads(path.read_text())
        text = json.dumps({k: v for k, v in config.items() if k != "imports"})
        imported = {line.split()[-1] for line in config.get("imports", [])}
        for module in imported:
            assert f"{module}." in text, f"{path}: import {module} is never used"
        if path.name in ("train.json", "inference.json"):  # configs run on their own (not overlays)
            for module in optional:
                if f"${module}." in text or f" {module}." in text or f"({module}." in text:
                    assert module in imported, f"{path}: uses {module} without importing it"


def test_multi_gpu_calibrate_runs_both_passes_of_calibrate_on_the_setup_of_multi_gpu_evaluate():
    def load(name: str) -> dict:
        return json.loads((make_bundles.BASE / name).read_text())

    ddp, evaluate, calibrate = load("multi_gpu_calibrate.json"), load("multi_gpu_evaluate.json"), load("calibrate.json")
    for key in ("device", "network", "validate#sampler", "validate#dataloader#sampler", "finalize"):
        assert ddp[key] == evaluate[key], key
    assert ddp["initialize"][: len(evaluate["initialize"])] == evaluate["initialize"]
    assert set(calibrate["initialize"]) <= set(ddp["initialize"])  # calibrate's own steps are kept
    # the temperature pass, then the conformal pass, whose evaluator reads the sampled validation loader
    assert ddp["run"] == calibrate["run"] == ["$@validate#evaluator.run()", "$@conformal#evaluator.run()"]
    assert calibrate["conformal"]["evaluator"]["val_data_loader"] == "@validate#dataloader"
