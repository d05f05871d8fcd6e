"""The device of a process on its node (``monai_nacl.distributed.local_rank`` / ``local_device``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monai_nacl.distributed import LOCAL_RANK_VARIABLES, local_device, local_rank

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_launcher(monkeypatch):
    """An environment where no launcher has set a local rank (CI may run under one)."""
    for name in LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_local_rank_reads_torchrun_environment(no_launcher):
    no_launcher.setenv("LOCAL_RANK", "3")
    assert local_rank() == 3
    no_launcher.delenv("LOCAL_RANK")
    assert local_rank() == 0  # no process group, no launcher variable


@pytest.mark.parametrize("name", LOCAL_RANK_VARIABLES)
def test_local_rank_reads_each_launcher(no_launcher, name):
    no_launcher.setenv(name, "2")
    assert local_rank() == 2


@pytest.mark.parametrize("own", ["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"])
def test_the_process_own_variable_wins_over_slurm(no_launcher, own):
    """torchrun or mpirun inside a Slurm allocation: every process inherits its srun task's SLURM_LOCALID (0 for
    the one task per node); its own launcher's variable is the process's index."""
    no_launcher.setenv("SLURM_LOCALID", "0")
    no_launcher.setenv(own, "3")
    assert local_rank() == 3


@pytest.mark.parametrize("name", ["LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"])
@pytest.mark.parametrize("bad", ["-1", "one", "1.5", "", "\u00b2"])
def test_local_rank_refuses_a_bad_environment(no_launcher, name, bad):
    no_launcher.setenv(name, bad)
    with pytest.raises(ValueError, match=name):
        local_rank()


def test_local_device_on_a_node_without_cuda(no_launcher):
    monkeypatch = no_launcher
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device() == torch.device("cpu")


def test_local_device_is_the_local_gpu_on_a_second_node(no_launcher):
    """Global rank 9 of two 8-GPU nodes is local rank 1: cuda:1, not cuda:9."""
    monkeypatch = no_launcher
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert local_device() == torch.device("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "8")
    with pytest.raises(ValueError, match="local rank 8 has no GPU: this node has 8"):
        local_device()
    # a launcher that sets no local rank: the global rank modulo the node's GPUs, with a warning that this
    # assumes equal nodes
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 9)
    with pytest.warns(UserWarning, match="global rank 9 modulo this node's 8 GPUs"):
        assert local_device() == torch.device("cuda:1")
    # one visible GPU per process (a scheduler's CUDA_VISIBLE_DEVICES): always cuda:0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device() == torch.device("cuda:0")


def test_multi_gpu_overlays_use_the_local_device():
    overlays = sorted((ROOT / "bundles").glob("*/configs/multi_gpu_*.json"))
    assert len(overlays) == 3 * len(list((ROOT / "bundles").glob("*/configs/train.json")))
    for path in overlays:
        assert json.loads(path.read_text())["device"] == "$monai_nacl.distributed.local_device()", path
