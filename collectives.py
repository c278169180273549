"""torch.distributed in four small helpers that are no-ops without a process group, so the same code runs in a
unit test, on one device and under torchrun (imports nothing of the project)."""
import os

import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def is_master():
    """Rank 0 logs and writes files (read from the environment: valid before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def all_reduce(tensor, op="sum"):
    """In-place all-reduce over the default group; a no-op without one. op: 'sum' or 'max'."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def setup_distributed():
    """-> (rank, world, device). Under torchrun (RANK set): NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device
