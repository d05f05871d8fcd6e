"""Write the six dataset bundles of the NACL paper from one table of per-dataset choices.

The bundles are plain Model Zoo bundles (JSON configs a reader edits and runs as usual); this script only keeps
their shared structure identical. Edit a dataset's entry in ``DATASETS`` (or the shared pieces below) and run
``python tools/make_dataset_bundles.py``; ``tests/test_dataset_bundles.py`` fails when a bundle differs from
what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "bundles" / "hippocampus_mri_nacl_segmentation"
VERSION = "0.2.0"

PAPER = (
    "Murugesan, B., Adiga Vasudeva, S., Liu, B., Lombaert, H., Ben Ayed, I., Dolz, J. 'Neighbor-Aware Calibration "
    "of Segmentation Networks with Penalty-Based Constraints.' Medical Image Analysis (2024). arXiv:2401.14487"
)

DATASETS = {
    "acdc_cardiac_mri_nacl_segmentation": {
        "title": "ACDC cardiac MRI NACL segmentation",
        "layout": "acdc",
        "dataset_dir": "/workspace/data/ACDC/database",
        "modality": "MR",
        "channels": ["cine MRI"],
        "classes": ["background", "right ventricle", "myocardium", "left ventricle"],
        "label_values": [0, 1, 2, 3],
        "pixdim": [1.5, 1.5, 5.0],
        "patch": [160, 160, 16],
        "strides": [[2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
        "task": "Calibrated segmentation of the right ventricle, myocardium and left ventricle in cine cardiac MRI",
        "source": "ACDC challenge (MICCAI 2017), https://www.creatis.insa-lyon.fr/Challenge/acdc/; terms of the "
        "organisers (registration required)",
        "layout_doc": "`training/patientNNN/patientNNN_frameNN.nii.gz` with `patientNNN_frameNN_gt.nii.gz` for the "
        "end-diastolic and end-systolic frames (the two frames of a patient stay in one split); `Info.cfg` is not "
        "needed. Labels 1 RV, 2 myocardium, 3 LV. In-plane about 1.4-1.7 mm, slices 5-10 mm.",
        "obtain": "Register at the ACDC challenge site, download the `database` archive and point `dataset_dir` at "
        "the folder holding `training/`.",
        "cite": "Bernard, O. et al. 'Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures "
        "Segmentation and Diagnosis: Is the Problem Solved?' IEEE TMI 37(11), 2018",
        "gpu": "one 16 GB GPU; about 30 s per epoch of 140 training frames at batch 4",
    },
    "flare21_abdominal_ct_nacl_segmentation": {
        "title": "FLARE21 abdominal CT NACL segmentation",
        "layout": "flare21",
        "cache_rate": 0.3,
        "dataset_dir": "/workspace/data/FLARE21",
        "modality": "CT",
        "window": [-125, 275],
        "channels": ["CT"],
        "classes": ["background", "liver", "kidney", "spleen", "pancreas"],
        "label_values": [0, 1, 2, 3, 4],
        "pixdim": [1.5, 1.5, 2.5],
        "patch": [160, 160, 64],
        "strides": [[2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "task": "Calibrated segmentation of liver, kidneys, spleen and pancreas in abdominal CT",
        "source": "MICCAI FLARE 2021 challenge, https://flare.grand-challenge.org/; terms of the organisers",
        "layout_doc": "`TrainingImg/train_NNN_0000.nii.gz` with `TrainingMask/train_NNN.nii.gz` (the FLARE21 "
        "release); nnU-Net-style `imagesTr/*_0000.nii.gz` + `labelsTr/*.nii.gz` is read as well. Labels 1 liver, "
        "2 kidneys, 3 spleen, 4 pancreas. CT windowed to [-125, 275] HU.",
        "obtain": "Register for FLARE21 on grand-challenge.org, download the 361 training cases and point "
        "`dataset_dir` at the folder holding `TrainingImg/` and `TrainingMask/`.",
        "cite": "Ma, J. et al. 'Fast and Low-GPU-memory abdomen CT organ segmentation: The FLARE challenge.' "
        "Medical Image Analysis 82, 102616 (2022)",
        "gpu": "one 24 GB GPU; CT volumes are large, so expect a few minutes per epoch over 250 cases",
    },
    "brats19_brain_tumor_mri_nacl_segmentation": {
        "title": "BraTS 2019 brain tumour MRI NACL segmentation",
        "layout": "brats19",
        "cache_rate": 0.2,
        "dataset_dir": "/workspace/data/MICCAI_BraTS_2019_Data_Training",
        "modality": "MR",
        "channels": ["flair", "t1", "t1ce", "t2"],
        "classes": ["background", "necrotic and non-enhancing core", "oedema", "enhancing tumour"],
        "label_values": [0, 1, 2, 4],
        "regions": True,
        "pixdim": [1.0, 1.0, 1.0],
        "patch": [128, 128, 128],
        "strides": [2, 2, 2, 2],
        "task": "Calibrated segmentation of glioma sub-regions in multi-parametric brain MRI, evaluated as "
        "enhancing tumour, tumour core and whole tumour",
        "source": "BraTS 2019 (CBICA, University of Pennsylvania), https://www.med.upenn.edu/cbica/brats2019/; "
        "terms of the organisers (registration required)",
        "layout_doc": "`{HGG,LGG}/BraTS19_<inst>_<n>_1/BraTS19_<inst>_<n>_1_{flair,t1,t1ce,t2,seg}.nii.gz` (optionally "
        "below `MICCAI_BraTS_2019_Data_Training/`). Labels 0/1/2/4 are trained as classes 0/1/2/3 and "
        "evaluated as the regions ET (4), TC (1+4) and WT (1+2+4); the inference output uses 0/1/2/4 again.",
        "obtain": "Request BraTS 2019 from CBICA, unpack `MICCAI_BraTS_2019_Data_Training` and point `dataset_dir` "
        "at it.",
        "cite": "Menze, B. H. et al. 'The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS).' IEEE TMI "
        "34(10), 2015; Bakas, S. et al., arXiv:1811.02629",
        "gpu": "one 24 GB GPU; about 2 min per epoch over 235 cases",
    },
    "prostate_mri_nacl_segmentation": {
        "title": "Prostate MRI NACL segmentation (MSD Task05)",
        "layout": "msd",
        "dataset_dir": "/workspace/data/Task05_Prostate",
        "modality": "MR",
        "channels": ["T2", "ADC"],
        "classes": ["background", "peripheral zone", "transition zone"],
        "label_values": [0, 1, 2],
        "pixdim": [0.625, 0.625, 3.6],
        "patch": [192, 192, 24],
        "strides": [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
        "task": "Calibrated segmentation of the prostate peripheral and transition zones in T2 + ADC MRI",
        "source": "Medical Segmentation Decathlon Task05_Prostate (Radboud University Nijmegen), "
        "http://medicaldecathlon.com/, CC-BY-SA 4.0",
        "layout_doc": "MSD layout: `dataset.json`, `imagesTr/prostate_NN.nii.gz` (4D: T2, ADC) and "
        "`labelsTr/prostate_NN.nii.gz`; labels 1 PZ, 2 TZ. In-plane about 0.6 mm, slices 3.6-4 mm.",
        "obtain": "`monai.apps.DecathlonDataset(root_dir='/workspace/data', task='Task05_Prostate', "
        "section='training', download=True)`, then point `dataset_dir` at `/workspace/data/Task05_Prostate`.",
        "cite": "Antonelli, M. et al. 'The Medical Segmentation Decathlon.' Nature Communications 13, 4128 (2022)",
        "gpu": "one 16 GB GPU; 32 cases, seconds per epoch",
    },
    "kits19_kidney_ct_nacl_segmentation": {
        "title": "KiTS19 kidney tumour CT NACL segmentation",
        "layout": "kits19",
        "cache_rate": 0.5,
        "dataset_dir": "/workspace/data/kits19",
        "modality": "CT",
        "window": [-79, 304],
        "channels": ["CT"],
        "classes": ["background", "kidney", "tumour"],
        "label_values": [0, 1, 2],
        "pixdim": [1.62, 1.62, 3.22],
        "patch": [160, 160, 80],
        "strides": [[2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "task": "Calibrated segmentation of kidneys and kidney tumours in contrast-enhanced CT",
        "source": "KiTS19 challenge, https://kits19.grand-challenge.org/, data from "
        "https://github.com/neheller/kits19 (CC-BY-NC-SA 4.0)",
        "layout_doc": "`data/case_NNNNN/imaging.nii.gz` with `segmentation.nii.gz` (cases without a segmentation "
        "are left out). The files store axial slices along the first array axis; the RAS reorientation reads "
        "that from the affine. Labels 1 kidney, 2 tumour. CT windowed to [-79, 304] HU.",
        "obtain": "Clone https://github.com/neheller/kits19 and run its `starter_code/get_imaging.py`; point "
        "`dataset_dir` at the repository folder (the one holding `data/`).",
        "cite": "Heller, N. et al. 'The state of the art in kidney and kidney tumor segmentation in "
        "contrast-enhanced CT imaging: Results of the KiTS19 challenge.' Medical Image Analysis 67, 101821 (2021)",
        "gpu": "one 24 GB GPU; a few minutes per epoch over 147 cases",
    },
    "mrbrains18_brain_mri_nacl_segmentation": {
        "title": "MRBrainS18 brain tissue MRI NACL segmentation",
        "layout": "mrbrains18",
        "dataset_dir": "/workspace/data/MRBrainS18",
        "modality": "MR",
        "channels": ["FLAIR", "T1", "T1-IR"],
        "classes": ["background", "grey matter", "white matter", "cerebrospinal fluid"],
        "label_values": list(range(11)),
        "label_map": [0, 1, 1, 2, 2, 3, 3, 0, 0, 0, 0],
        "pixdim": [0.958, 0.958, 3.0],
        "patch": [192, 192, 32],
        "strides": [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
        "task": "Calibrated segmentation of grey matter, white matter and cerebrospinal fluid in multi-sequence "
        "brain MRI",
        "source": "MRBrainS18 challenge (UMC Utrecht), https://mrbrains18.isi.uu.nl/; terms of the organisers",
        "layout_doc": "`training/<id>/pre/{FLAIR,reg_T1,reg_IR}.nii.gz` (bias-corrected, registered to FLAIR) with "
        "`training/<id>/segm.nii.gz`. The ten labels are merged as in the challenge's three-class evaluation: "
        "grey matter = cortical GM (1) + basal ganglia (2), white matter = WM (3) + WM lesions (4), CSF = "
        "extracerebral CSF (5) + ventricles (6); cerebellum (7), brain stem (8), infarction (9) and other (10) "
        "become background. 0.958 x 0.958 x 3.0 mm.",
        "obtain": "Register at the MRBrainS18 site, download the training data and point `dataset_dir` at the "
        "folder holding `training/`.",
        "cite": "Kuijf, H. J. et al. 'MR Brain Segmentation Challenge 2018 (MRBrainS18).' (2018); "
        "https://mrbrains18.isi.uu.nl/",
        "gpu": "one 16 GB GPU; the 7 labelled cases split 5 / 1 / 1, seconds per epoch",
    },
}


def deterministic(spec: dict, keys=("image", "label")) -> list[dict]:
    keys = list(keys)
    has_label = "label" in keys
    out = [
        {"_target_": "LoadImaged", "keys": keys, "ensure_channel_first": True, "image_only": True},
        {"_target_": "EnsureTyped", "keys": keys},
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"},
        {
            "_target_": "monai_nacl.transforms.SafeSpacingd",
            "keys": keys,
            "pixdim": "@pixdim",
            "mode": ["bilinear", "nearest"] if has_label else "bilinear",
        },
    ]
    if spec["modality"] == "CT":
        lo, hi = spec["window"]
        out.append(
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi, "b_min": 0.0, "b_max": 1.0}
        )
        out[-1]["clip"] = True
    else:
        out.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True})
    if has_label and (spec.get("regions") or spec.get("label_map")):
        target = list(range(len(spec["label_values"]))) if spec.get("regions") else spec["label_map"]
        out.append(
            {
                "_target_": "MapLabelValued",
                "keys": "label",
                "orig_labels": spec["label_values"],
                "target_labels": target,
            }
        )
    return out


def network(spec: dict) -> dict:
    return {
        "_target_": "monai_nacl.calibration.TemperatureScaled",
        "network": {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": len(spec["channels"]),
            "out_channels": "@num_classes",
            "channels": [32, 64, 128, 256, 320],
            "strides": spec["strides"],
            "num_res_units": 2,
            "norm": "instance",
        },
        # one temperature near the predicted structures and one elsewhere (docs/calibration.md)
        "foreground_margin": 1,
        "dropout": 0.0,
    }


def common(spec: dict) -> dict:
    return {
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": spec["dataset_dir"],
        "num_classes": len(spec["classes"]),
        "class_names": spec["classes"],
        "pixdim": spec["pixdim"],
        "patch_size": spec["patch"],
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network(spec),
        "network": "$@network_def.to(@device)",
    }


def to_raw_labels(spec: dict, keys) -> dict:
    """Training classes 0..C-1 back to the dataset's raw label values (BraTS 0/1/2/3 -> 0/1/2/4)."""
    n = len(spec["label_values"])
    return {
        "_target_": "MapLabelValued",
        "keys": keys,
        "orig_labels": list(range(n)),
        "target_labels": spec["label_values"],
    }


def intensity_text(spec: dict) -> str:
    if spec["modality"] == "CT":
        return f"CT clipped to [{spec['window'][0]}, {spec['window'][1]}] HU and scaled to [0, 1]"
    return "normalised per case and channel to zero mean and unit variance over non-zero voxels"


def postprocessing(spec: dict) -> dict:
    """Validation postprocessing: probabilities for calibration, then one-hot (or BraTS regions) for Dice/HD95."""
    steps = [
        # logits for the temperature fit of the best model (CalibratedModelSaver) and of calibrate.json
        {"_target_": "CopyItemsd", "keys": "pred", "names": "logits"},
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "CopyItemsd", "keys": ["pred", "label"], "names": ["prob", "label_index"]},
    ]
    if spec.get("regions"):
        steps += [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            to_raw_labels(spec, ["pred", "label"]),
            {"_target_": "ConvertToMultiChannelBasedOnBratsClassesd", "keys": ["pred", "label"]},
        ]
    else:
        steps.append(
            {
                "_target_": "AsDiscreted",
                "keys": ["pred", "label"],
                "argmax": [True, False],
                "to_onehot": "@num_classes",
            }
        )
    return {"_target_": "Compose", "transforms": steps}


def from_engine(keys):
    return f"$monai.handlers.from_engine({keys!r})"


def train_config(spec: dict) -> dict:
    regions = bool(spec.get("regions"))
    cfg = {"imports": ["$import os", "$import ignite", "$import monai_nacl"], **common(spec)}
    cfg.update(
        {
            # resume checkpoints beside the model folder, one folder per ckpt_dir (MONAI Label lists models/*.pt)
            "resume_dir": "$@ckpt_dir.rstrip('/') + '_resume'",
            "label_values": spec["label_values"],
            "neighborhood_mm": "$3 * min(@pixdim)",
            "datalist": {
                "_target_": "monai_nacl.data.build_datalist",
                "dataset": spec["layout"],
                "dataset_dir": "@dataset_dir",
                "fractions": [0.7, 0.1, 0.2],
                "seed": 2026,
            },
            "val_interval": 5,
            "loss": {
                "_target_": "monai_nacl.losses.NACLLoss",
                "num_classes": "@num_classes",
                "base": "dice_ce",
                "alpha": 0.1,
                "kernel": "mean",
            },
            "optimizer": {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()", "lr": 0.001},
            "lr_scheduler": {
                "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                "optimizer": "@optimizer",
                "T_max": "@train#trainer#max_epochs",
                # a floor, so the LR never reaches 0 (the last epochs of any run still learn)
                "eta_min": "$@optimizer#lr * 0.01",
            },
        }
    )
    random_transforms = [
        {"_target_": "SpatialPadd", "keys": ["image", "label"], "spatial_size": "@patch_size"},
        {
            "_target_": "monai_nacl.transforms.NeighborPriord",
            "keys": "label",
            "num_classes": "@num_classes",
            "kernel": "@loss#kernel",
            "neighborhood_mm": "@neighborhood_mm",
            "prior_key": "prior",
        },
        {
            "_target_": "RandCropByPosNegLabeld",
            "keys": ["image", "label", "prior"],
            "label_key": "label",
            "spatial_size": "@patch_size",
            "pos": 2,
            "neg": 1,
            "num_samples": 2,
        },
        {
            "_target_": "RandAffined",
            "keys": ["image", "label", "prior"],
            "prob": 0.2,
            "rotate_range": [0.2, 0.2, 0.2],
            "scale_range": [0.1, 0.1, 0.1],
            "mode": ["bilinear", "nearest", "bilinear"],
            # the prior keeps its border where the volume rotates in (zeros would make tau sum to 0 there)
            "padding_mode": ["zeros", "zeros", "border"],
        },
        {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 0.5},
        {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5},
    ]
    dice_kwargs = {"include_background": regions, "output_transform": from_engine(["pred", "label"])}
    cfg["train"] = {
        "deterministic_transforms": deterministic(spec),
        "random_transforms": random_transforms,
        "preprocessing": {
            "_target_": "Compose",
            "transforms": "$@train#deterministic_transforms + @train#random_transforms",
        },
        "dataset": {
            "_target_": "CacheDataset",
            "data": "$@datalist['training']",
            "transform": "@train#preprocessing",
            "cache_rate": spec.get("cache_rate", 1.0),
            "num_workers": 4,
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@train#dataset",
            "batch_size": 2,
            "shuffle": True,
            "num_workers": 4,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "AsDiscreted",
                    "keys": ["pred", "label"],
                    "argmax": [True, False],
                    "to_onehot": "@num_classes",
                },
            ],
        },
        "handlers": [
            {"_target_": "monai_nacl.handlers.PriorFromBatch", "loss": "@loss", "key": "prior"},
            {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": True},
            {
                "_target_": "monai_nacl.handlers.IntervalValidationHandler",
                "validator": "@validate#evaluator",
                "interval": "@val_interval",
            },
            {
                "_target_": "monai_nacl.handlers.ResumableCheckpoint",
                "save_dir": "@resume_dir",
                "save_dict": {
                    "network": "@network",
                    "optimizer": "@optimizer",
                    "lr_scheduler": "@lr_scheduler",
                    "model_saver": "@validate#model_saver",
                },
            },
            {
                "_target_": "StatsHandler",
                "tag_name": "train_loss",
                "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
            },
            {
                "_target_": "TensorBoardStatsHandler",
                "log_dir": "@output_dir",
                "tag_name": "train_loss",
                "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
            },
        ],
        "key_metric": {
            "train_mean_dice": {
                "_target_": "MeanDice",
                "include_background": False,
                "output_transform": from_engine(["pred", "label"]),
            }
        },
        "trainer": {
            "_target_": "SupervisedTrainer",
            "max_epochs": 300,
            "device": "@device",
            "train_data_loader": "@train#dataloader",
            "network": "@network",
            "loss_function": "@loss",
            "optimizer": "@optimizer",
            "inferer": "@train#inferer",
            "postprocessing": "@train#postprocessing",
            "key_train_metric": "@train#key_metric",
            "train_handlers": "@train#handlers",
            "amp": "$torch.cuda.is_available()",
        },
    }
    cfg["validate"] = {
        "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
        "dataset": {
            "_target_": "CacheDataset",
            "data": "$@datalist['validation']",
            "transform": "@validate#preprocessing",
            "cache_rate": spec.get("cache_rate", 1.0),
            "num_workers": 4,
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@validate#dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 4,
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@patch_size", "sw_batch_size": 2, "overlap": 0.5},
        "postprocessing": postprocessing(spec),
        "calibration": {
            "_target_": "monai_nacl.handlers.CalibrationHandler",
            "num_classes": "@num_classes",
            "mask": "foreground",
            "output_transform": from_engine(["prob", "label_index"]),
        },
        "model_saver": {
            "_target_": "monai_nacl.handlers.CalibratedModelSaver",
            "save_dir": "@ckpt_dir",
            "network": "@network_def",
            "num_classes": "@num_classes",
            "output_transform": from_engine(["logits", "label_index"]),
        },
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
            "@validate#model_saver",
        ],
        "key_metric": {"val_mean_dice": {"_target_": "MeanDice", **dice_kwargs}},
        "additional_metrics": {"val": "@validate#calibration"},
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@validate#dataloader",
            "network": "@network",
            "inferer": "@validate#inferer",
            "postprocessing": "@validate#postprocessing",
            "key_val_metric": "@validate#key_metric",
            "additional_metrics": "@validate#additional_metrics",
            "val_handlers": "@validate#handlers",
            "amp": "$torch.cuda.is_available()",
        },
    }
    cfg["initialize"] = [
        "$monai.utils.set_determinism(seed=123)",
        # the data actually used: MONAI Label sets train#dataset#data and validate#dataset#data itself
        "$monai_nacl.data.check_datalist(@train#dataset#data, @num_classes, label_values=@label_values, "
        "name='training datalist')",
        "$monai_nacl.data.check_datalist(@validate#dataset#data, @num_classes, label_values=@label_values, "
        "name='validation datalist')",
    ]
    # a run that saved no model (no validation case, NaN metric) fails instead of ending with exit 0
    cfg["run"] = ["$@train#trainer.run()", "$@validate#model_saver.check_saved()"]
    return cfg


def evaluate_config(spec: dict) -> dict:
    regions = bool(spec.get("regions"))
    return {
        "validate#dataset#data": "$@datalist['test']",
        "validate#handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@ckpt_dir + '/model.pt'",
                "load_dict": {"model": "@network"},
            },
            {"_target_": "StatsHandler", "iteration_log": False},
            {
                "_target_": "monai_nacl.handlers.ReliabilityDiagramHandler",
                "calibration": "@validate#calibration",
                "output_dir": "@output_dir",
                "class_names": "@class_names",
            },
            {
                "_target_": "MetricsSaver",
                "save_dir": "@output_dir",
                "metrics": [
                    "val_mean_dice",
                    "val_hd95",
                    "val_ece",
                    "val_cece",
                    "val_ace",
                    "val_mce",
                    "val_nll",
                    "val_brier",
                ],
                "metric_details": ["val_mean_dice", "val_hd95", "val_ece", "val_cece", "val_nll", "val_brier"],
                "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
                "summary_ops": "*",
            },
        ],
        "validate#additional_metrics": {
            "val": "@validate#calibration",
            "val_hd95": {
                "_target_": "HausdorffDistance",
                "include_background": regions,
                "percentile": 95,
                "reduction": "mean",
                "output_transform": from_engine(["pred", "label"]),
            },
        },
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
        "run": ["$@validate#evaluator.run()"],
    }


def calibrate_config(spec: dict) -> dict:
    # the validation postprocessing keeps the logits the temperature is fitted on
    return json.loads((TEMPLATE / "configs" / "calibrate.json").read_text())


def inference_config(spec: dict) -> dict:
    cfg = {"imports": ["$import glob", "$import os", "$import monai_nacl"], **common(spec)}
    cfg["displayable_configs"] = {"output_kind": ["segmentation", "probabilities", "entropy"]}
    # a model.pt not known to be calibrated for its weights is an error (set false to use it anyway)
    cfg["require_calibrated"] = True
    # a folder of images (every format the readers know) when given, else the test split of the dataset
    cfg["input_dir"] = None
    cfg["datalist"] = (
        "$monai_nacl.data.image_datalist(@input_dir) if @input_dir else "
        f"monai_nacl.data.inference_datalist({spec['layout']!r}, @dataset_dir)"
    )
    pre = deterministic(spec, keys=("image",))
    pre.insert(2, {"_target_": "monai_nacl.transforms.EnsureFinited", "keys": "image"})
    cfg["preprocessing"] = {"_target_": "Compose", "transforms": pre}
    # a bad file is reported by name and skipped; the failures are collected in this process (num_workers 0)
    cfg["dataset"] = {
        "_target_": "monai_nacl.data.InferenceDataset",
        "data": "@datalist",
        "transform": "@preprocessing",
    }
    cfg["dataloader"] = {
        "_target_": "DataLoader",
        "dataset": "@dataset",
        "batch_size": 1,
        "shuffle": False,
        "num_workers": 0,
    }
    cfg["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": "@patch_size", "sw_batch_size": 2, "overlap": 0.5}
    post = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "image",
            "nearest_interp": False,
            "to_tensor": True,
        },
        {"_target_": "CopyItemsd", "keys": "pred", "names": "prob"},
        {"_target_": "monai_nacl.transforms.VoxelEntropyd", "keys": "prob", "output_key": "entropy"},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]
    if spec.get("regions"):
        post.append(to_raw_labels(spec, "pred"))
    post.append(
        {
            "_target_": "monai_nacl.transforms.StructureSummaryd",
            "keys": "pred",
            "prob_key": "prob",
            "entropy_key": "entropy",
            "class_names": "@class_names",
            # the segmentation holds raw label values where they were mapped back above, class indices otherwise
            "label_values": spec["label_values"] if spec.get("regions") else None,
            "output_dir": "@output_dir",
        }
    )
    for key, postfix, dtype in (("pred", "seg", "$numpy.uint8"), ("prob", "prob", None), ("entropy", "entropy", None)):
        save = {
            "_target_": "SaveImaged",
            "keys": key,
            "output_dir": "@output_dir",
            "output_postfix": postfix,
            "resample": False,
            "separate_folder": False,
        }
        if dtype:
            save["output_dtype"] = dtype
        post.append(save)
    post.append(
        {
            "_target_": "monai_nacl.transforms.SelectOutputd",
            "keys": "pred",
            "output_kind": "@displayable_configs#output_kind",
        }
    )
    cfg["postprocessing"] = {"_target_": "Compose", "transforms": post}
    cfg["handlers"] = [
        {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'", "load_dict": {"model": "@network"}},
        {"_target_": "StatsHandler", "iteration_log": False},
    ]
    cfg["evaluator"] = {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
        "amp": "$torch.cuda.is_available()",
    }
    cfg["initialize"] = [
        "$monai.utils.set_determinism(seed=123)",
        # an unreadable or stale model.pt is reported before any image is read (these bundles ship no weights)
        "$monai_nacl.calibration.warn_if_not_calibrated(@ckpt_dir + '/model.pt', missing_ok=True, "
        "strict=@require_calibrated)",
    ]
    cfg["run"] = ["$@evaluator.run()"]
    cfg["finalize"] = ["$@dataset.raise_if_failed()"]
    return cfg


def multi_gpu_train() -> dict:
    cfg = json.loads((TEMPLATE / "configs" / "multi_gpu_train.json").read_text())
    cfg["initialize"] = [
        line.replace("@num_classes, name=", "@num_classes, label_values=@label_values, name=")
        for line in cfg["initialize"]
    ]
    return cfg


def metadata(spec: dict) -> dict:
    meta = json.loads((TEMPLATE / "configs" / "metadata.json").read_text())
    meta["version"] = VERSION
    meta["changelog"] = {
        VERSION: "lifecycle: best model saved with temperatures refitted for its own weights and a calibration "
        "record; resume checkpoints beside models/ (models_resume/); last epoch always validates; MONAI Label training checks the "
        "data it is given; inference on any folder with bad files reported, per-structure summaries and an "
        "output_kind option",
        "0.1.0": "first release: configs only, no trained weights yet",
    }
    meta["name"] = spec["title"]
    meta["task"] = spec["task"]
    meta["description"] = (
        f"A 3D UNet trained with the Neighbor-Aware CaLibration (NACL) loss (Dice+CE base, prior from the "
        f"transform) and temperature scaling, for {spec['title'].split(' NACL')[0]}. Configs only: no weights "
        "ship; train them with configs/train.json on your copy of the data."
    )
    meta["data_source"] = spec["source"]
    chan = ", ".join(spec["channels"])
    norm = intensity_text(spec)
    meta["image_classes"] = f"{len(spec['channels'])} channel(s) ({chan}), resampled to {spec['pixdim']} mm, {norm}"
    meta["label_classes"] = "single channel labels: " + ", ".join(f"{i} {c}" for i, c in enumerate(spec["classes"]))
    meta["pred_classes"] = f"{len(spec['classes'])} channels of probabilities ({', '.join(spec['classes'])})"
    meta["eval_metrics"] = {}
    meta["references"] = [PAPER, spec["cite"], "Guo, C., et al. 'On Calibration of Modern Neural Networks.' ICML 2017"]
    # any multiple of the strides is accepted (sliding-window inference)
    strides = [s if isinstance(s, list) else [s] * 3 for s in spec["strides"]]
    factors = [1, 1, 1]
    for s in strides:
        factors = [f * v for f, v in zip(factors, s)]
    shape = [f"{2 * f}*n" for f in factors]  # n = 1 keeps a 2-voxel bottleneck for instance norm
    fmt = meta["network_data_format"]
    fmt["inputs"]["image"].update(
        modality=spec["modality"],
        num_channels=len(spec["channels"]),
        spatial_shape=shape,
        format="hounsfield" if spec["modality"] == "CT" else "magnitude",
        channel_def={str(i): c for i, c in enumerate(spec["channels"])},
    )
    fmt["outputs"]["pred"].update(
        num_channels=len(spec["classes"]),
        spatial_shape=shape,
        channel_def={str(i): c for i, c in enumerate(spec["classes"])},
    )
    return meta


README = """# {title}

A MONAI bundle that trains, calibrates, evaluates and serves a 3D UNet with the **Neighbor-Aware CaLibration**
loss (NACL; Murugesan et al., Medical Image Analysis 2024, arXiv:2401.14487) for {task_lower}.
Research use only; not for diagnosis.

**No trained weights and no results ship with this bundle yet.** `models/` is empty until you train: the
configs are proven end to end only on small synthetic fixtures written in this dataset's file layout
(`monai_nacl.data.write_fixture("{layout}", ...)`, used by `tests/test_dataset_bundles.py`), never on the real
data. The resources below are estimates, not measurements.

## Classes

{classes}

## Data

* Source: {source}.
* Layout read from `dataset_dir` by `monai_nacl.data.build_datalist("{layout}", dataset_dir)`: {layout_doc}
  This is the layout of the public release as we know it from the organisers' descriptions; it was not
  checked against a real copy here. It is what the fixtures reproduce. If your copy differs, build your own
  datalist (`[{{"image": ..., "label": ...}}, ...]` per split) and override `datalist`.
* How to get it: {obtain}
* Split: a seeded (2026) shuffle of patients, 70 % training, 10 % validation (checkpoint selection and the
  temperature), 20 % test. Every training and validation case is checked before training
  (`monai_nacl.data.check_datalist`: files, shapes, affines, label values {label_values}).

## Model and training

* Network: `TemperatureScaled(UNet(channels 32-64-128-256-320, strides {strides}, 2 residual units,
  instance norm), foreground_margin=1)`, {in_channels} input channel(s) ({channels}).
* Preprocessing: RAS orientation, resampling to {pixdim} mm (`monai_nacl.transforms.SafeSpacingd`, which
  survives MONAI Label's `image_*` string keys), {norm}{label_note}.
* Training: patches of {patch} voxels (2 per volume, 2:1 foreground:background centres), random affine,
  intensity scale and shift. The neighbour prior is computed on the whole resampled volume by
  `NeighborPriord` over a neighbourhood of 3 × the finest spacing ({prior_mm} mm, so the kernel is spacing-aware
  where voxels are anisotropic) and cropped with the image; `PriorFromBatch` hands it to the loss.
* Memory: `CacheDataset` keeps {cache}% of the resampled training and validation volumes in RAM
  (`train#dataset#cache_rate`, `validate#dataset#cache_rate`); lower it if memory is short.
* Loss: `monai_nacl.losses.NACLLoss(base="dice_ce", alpha=0.1, kernel="mean")`. AdamW lr 1e-3, cosine
  schedule over 300 epochs, mixed precision, validation every 5 epochs; best validation mean Dice kept.
{eval_note}* Expected resources: {gpu} (estimate).

## Commands

Run from this folder; `DATA` is your copy of the dataset.

    python -m monai.bundle run --config_file configs/train.json --bundle_root . --dataset_dir $DATA
    python -m monai.bundle run --config_file "['configs/train.json','configs/calibrate.json']" --bundle_root . --dataset_dir $DATA
    python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" --bundle_root . --dataset_dir $DATA
    python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir $DATA
    torchrun --nproc_per_node=2 -m monai.bundle run --config_file "['configs/train.json','configs/multi_gpu_train.json']" --bundle_root . --dataset_dir $DATA

`calibrate.json` fits two temperatures on the validation split — one for the voxels within 1 voxel of the
predicted foreground, one for the rest ([docs/calibration.md](../../../docs/calibration.md)) — and writes them
into `models/model.pt`;
`evaluate.json` reports Dice, HD95, ECE (top-label, 15 bins, ground-truth foreground voxels, per volume),
class-wise ECE, ACE, MCE, NLL and Brier on the test split with reliability diagrams and per-case CSVs;
`inference.json` segments the test split's images (or every image in `--input_dir DIR`) and writes, in the
original image geometry, the segmentation (`_seg`), the class probabilities (`_prob`), the voxel entropy
(`_entropy`) and a per-structure summary (`_summary.json`: volume in mL, mean entropy, mean maximum
probability); a file that cannot be read or holds NaN/Inf voxels is named, skipped, and fails the run at the
end (non-zero exit). Training saves its best model with temperatures refitted for its own weights and a record
beside it (`models/model.calibration.json`); an interrupted run resumes from
`models_resume/train_checkpoint_<epoch>.pt` (`<ckpt_dir>_resume`; deleted when the run completes). Check the bundle with
`python -m monai_nacl.bundle_check bundles/{name} --dataset-dir {name}=$DATA`.

## MONAI Label

The ids MONAI Label's bundle tasks read are present (`network_def`, `network`, `train#dataset#data`,
`validate#dataset#data`, input `image`, output `pred`, label names in `channel_def`).

## Citation

* {paper}
* {cite}

## Licence

The configs are Apache-2.0 (`LICENSE`). The data keeps its own terms ({source}).
"""


def readme(spec: dict, name: str) -> str:
    classes = "\n".join(f"| {i} | {c} |" for i, c in enumerate(spec["classes"]))
    norm = intensity_text(spec)
    label_note = ""
    if spec.get("regions"):
        label_note = ", labels 0/1/2/4 mapped to classes 0/1/2/3"
    elif spec.get("label_map"):
        label_note = ", the ten labels merged into the three tissue classes"
    eval_note = ""
    if spec.get("regions"):
        eval_note = (
            "* Evaluation: Dice and HD95 on the BraTS regions tumour core, whole tumour and enhancing tumour\n"
            "  (`ConvertToMultiChannelBasedOnBratsClassesd`); calibration on the four training classes.\n"
        )
    return README.format(
        title=spec["title"],
        task_lower=spec["task"][0].lower() + spec["task"][1:],
        layout=spec["layout"],
        classes="| class | name |\n| --- | --- |\n" + classes,
        source=spec["source"],
        layout_doc=spec["layout_doc"],
        obtain=spec["obtain"],
        label_values=spec["label_values"],
        strides=json.dumps(spec["strides"]),
        in_channels=len(spec["channels"]),
        channels=", ".join(spec["channels"]),
        pixdim=" × ".join(str(p) for p in spec["pixdim"]),
        norm=norm,
        label_note=label_note,
        patch=" × ".join(str(p) for p in spec["patch"]),
        prior_mm=f"{3 * min(spec['pixdim']):g}",
        eval_note=eval_note,
        gpu=spec["gpu"],
        cache=round(100 * spec.get("cache_rate", 1.0)),
        name=name,
        paper=PAPER,
        cite=spec["cite"],
    )


def render(name: str, spec: dict) -> dict[str, str]:
    """Relative path -> file text for one bundle."""
    dump = lambda obj: json.dumps(obj, indent=4) + "\n"  # noqa: E731
    template = TEMPLATE / "configs"
    return {
        "configs/train.json": dump(train_config(spec)),
        "configs/evaluate.json": dump(evaluate_config(spec)),
        "configs/calibrate.json": dump(calibrate_config(spec)),
        "configs/inference.json": dump(inference_config(spec)),
        "configs/multi_gpu_train.json": dump(multi_gpu_train()),
        "configs/multi_gpu_evaluate.json": (template / "multi_gpu_evaluate.json").read_text(),
        "configs/metadata.json": dump(metadata(spec)),
        "configs/logging.conf": (template / "logging.conf").read_text(),
        "docs/README.md": readme(spec, name),
        "LICENSE": (TEMPLATE / "LICENSE").read_text(),
        "models/.gitkeep": "",
    }


def main(check: bool = False) -> int:
    stale = []
    for name, spec in DATASETS.items():
        for rel, text in render(name, spec).items():
            path = ROOT / "bundles" / name / rel
            if check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path.relative_to(ROOT)))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"out of date: {path}")
    return 1 if stale else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] not in ("--check",):
        raise SystemExit("usage: python tools/make_dataset_bundles.py [--check]")
    sys.exit(main(check="--check" in sys.argv))
