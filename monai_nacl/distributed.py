"""The ``torch.distributed`` steps the fitters need to see every rank's cases (the process count, a ragged all-gather
of rows, a sum, a broadcast), and the device of a process on its node (:func:`local_device`, used by the bundles'
``multi_gpu_*.json`` overlays).

Each is a no-op (its input returned) without an initialised process group of more than one process. Tensors travel
on :func:`monai.utils.get_dist_device` (the process's GPU under NCCL, the CPU under gloo) and come back on the CPU.
Every process must make the same calls in the same order, whatever it holds (a process with no case gathers an empty
tensor), or the others wait for it forever.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
import torch.distributed as dist
from monai.utils import evenly_divisible_all_gather, get_dist_device

__all__ = [
    "world_size",
    "LOCAL_RANK_VARIABLES",
    "local_rank",
    "local_device",
    "all_gather_rows",
    "all_reduce_sum",
    "broadcast_from_rank0",
]


def world_size() -> int:
    """The number of processes of the default ``torch.distributed`` group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# the variable each launcher sets to a process's index on its node, in the order they are read: Slurm's comes last
# because ``mpirun`` inside an allocation starts its ranks through one ``srun`` task per node, so every rank inherits
# that task's SLURM_LOCALID of 0 beside its MPI variable
LOCAL_RANK_VARIABLES = (
    "LOCAL_RANK",  # torchrun, torch.distributed.launch
    "OMPI_COMM_WORLD_LOCAL_RANK",  # Open MPI's mpirun
    "MPI_LOCALRANKID",  # MPICH, Intel MPI
    "MV2_COMM_WORLD_LOCAL_RANK",  # MVAPICH2
    "SLURM_LOCALID",  # srun
)


def local_rank() -> int:
    """This process's index on its own node.

    Read from the first of :data:`LOCAL_RANK_VARIABLES` that is set (``torchrun``, ``mpirun`` of Open MPI,
    MPICH / Intel MPI or MVAPICH2, or ``srun`` set one); else, with a process group, the global rank modulo the node's GPU count,
    which is right only for one process per GPU on nodes with equal GPU counts (a warning says so when the node has
    several GPUs); else 0.

    On one node the local and global ranks agree; on several, ``cuda:{global rank}`` names a GPU the node does not
    have (rank 8 of two 8-GPU nodes), which is why the bundles' overlays use this.

    Raises:
        ValueError: the variable read set to something that is not a non-negative integer (naming it).
    """
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            if not re.fullmatch(r"[0-9]+", value.strip()):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
            return int(value)
    if dist.is_available() and dist.is_initialized():
        count = torch.cuda.device_count()
        if count > 1:
            warnings.warn(
                f"No launcher set a local rank ({', '.join(LOCAL_RANK_VARIABLES)}): taking global rank "
                f"{dist.get_rank()} modulo this node's {count} GPUs, which is wrong on nodes with different GPU "
                "counts. Set LOCAL_RANK to the process's index on its node.",
                stacklevel=2,
            )
        return dist.get_rank() % max(1, count)
    return 0


def local_device() -> torch.device:
    """``cuda:{local_rank()}`` where CUDA is available, else the CPU. A process that sees one GPU only (a scheduler
    giving each task its own ``CUDA_VISIBLE_DEVICES``) gets ``cuda:0`` whatever its local rank.

    Raises:
        ValueError: a bad local-rank variable, or a local rank beyond the node's GPUs (naming both).
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index, count = local_rank(), torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda:0")
    if index >= count:
        raise ValueError(f"local rank {index} has no GPU: this node has {count} (cuda:0 to cuda:{count - 1}).")
    return torch.device(f"cuda:{index}")


def all_gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """The rows of ``rows`` of every process, one CPU tensor per rank in rank order (``[rows]`` on one process).

    Args:
        rows: ``N,*`` with ``N`` free to differ across processes (0 too) and ``*``, the dtype the same on all.
            ``bool`` is sent as ``uint8`` (NCCL has no bool).

    Returns:
        ``world_size()`` tensors, the ``r``-th holding rank ``r``'s rows.
    """
    if world_size() < 2:
        return [rows.cpu()]
    is_bool = rows.dtype == torch.bool
    data = rows.to(torch.uint8) if is_bool else rows
    parts = evenly_divisible_all_gather(data.to(get_dist_device()), concat=False)
    return [p.cpu().bool() if is_bool else p.cpu() for p in parts]


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the processes (same shape and dtype on all), as a new CPU tensor."""
    if world_size() < 2:
        return value.cpu().clone()
    total = value.detach().to(get_dist_device()).clone()
    dist.all_reduce(total)
    return total.cpu()


def broadcast_from_rank0(value: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``value`` on every process (same shape and dtype on all), as a new CPU tensor: where every rank
    computed the same quantity, this makes it identical to the last bit whatever each rank's floating point did."""
    if world_size() < 2:
        return value.cpu().clone()
    shared = value.detach().to(get_dist_device()).clone()
    dist.broadcast(shared, src=0)
    return shared.cpu()
