from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from monai_nacl.neighbor_prior import dense_kernel

HIPPOCAMPUS = Path(
    os.environ.get(
        "MONAI_NACL_HIPPOCAMPUS", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hippocampus"
    )
)


def reference_prior(
    labels, num_classes, kernel="mean", kernel_size=3, sigma=1.0, padding="replicate", ignore_index=None
):
    """Brute-force τ: explicit padding, dense kernel, grouped convolution, float64. Independent of the
    separable implementation under test."""
    dims = labels.ndim - 2
    k = dense_kernel(kernel, kernel_size, sigma, dims)
    radii = [s // 2 for s in k.shape]
    pad = []
    for r in reversed(radii):
        pad += [r, r]
    lab = labels.double()
    valid = torch.ones_like(lab) if ignore_index is None else (lab != ignore_index).double()
    onehot = torch.cat([(lab == c).double() * valid for c in range(num_classes)], 1)
    if padding == "replicate":
        onehot = F.pad(onehot, pad, mode="replicate")
        valid = F.pad(valid, pad, mode="replicate")
    elif padding == "zeros":
        onehot = F.pad(onehot, pad)
        valid = F.pad(valid, pad, value=1.0)  # outside voxels are empty, not ignored
    else:
        onehot = torch.cat([F.pad(onehot[:, :1], pad, value=1.0), F.pad(onehot[:, 1:], pad)], 1)
        valid = F.pad(valid, pad, value=1.0)
    conv = [F.conv1d, F.conv2d, F.conv3d][dims - 1]
    w = k[None, None]
    num = conv(onehot, w.expand(num_classes, 1, *k.shape), groups=num_classes)
    den = conv(valid, w)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def torchrun_bundle(bundle, configs, overrides: dict, timeout: int = 600):
    """Run ``monai.bundle run`` under ``torchrun --nproc_per_node=2`` on CPU (gloo); return the finished process."""
    import os
    import subprocess
    import sys

    cfg = bundle / "configs"
    files = "[" + ",".join(f"'{cfg / c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={29500 + os.getpid() % 1000}", "-m", "monai.bundle", "run", "--config_file", files]
    cmd += ["--meta_file", str(cfg / "metadata.json"), "--bundle_root", str(bundle)]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def tiny_bundle_overrides(tmp_path: Path) -> dict:
    """Overrides that make a bundle's workflow a seconds-long run on 2 + 1 + 1 phantom cases under ``tmp_path``:
    one epoch, validated after it, with every output folder in ``tmp_path``."""
    return {
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
        "dataset_dir": str(tmp_path / "data"),
        "num_train": 2,
        "num_val": 1,
        "num_test": 1,
        "val_interval": 1,
        "train#trainer#max_epochs": 1,
        "resume_dir": str(tmp_path / "checkpoints"),
    }


def bundle_workflow(bundle, configs, workflow_type: str, **override):
    """An initialised ``ConfigWorkflow`` of ``bundle`` (configs merged in order) whose properties all resolve."""
    from monai.bundle import ConfigWorkflow

    files = [str(bundle / "configs" / c) for c in configs]
    wf = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle),
        **override,
    )
    wf.initialize()
    assert wf.check_properties() == []
    return wf
