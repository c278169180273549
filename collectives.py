"""The device and torch.distributed in small helpers that are no-ops without a process group, so the same code runs
in a unit test, on one device and under torchrun (imports nothing of the project)."""
import os

import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def is_master():
    """Rank 0 logs and writes files (read from the environment: valid before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def rank_and_world():
    """(this process's rank, number of ranks); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_reduce(tensor, op="sum"):
    """In-place all-reduce over the default group; a no-op without one. op: 'sum' or 'max'."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def default_device(local_rank=0):
    """The GPU of this process (cuda:LOCAL_RANK) when there is one, else the CPU."""
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def setup_distributed():
    """-> (rank, world, device). Under torchrun (RANK set): NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, default_device()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = default_device(int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def autocast(amp, device):
    """bf16 / fp16 autocast on a GPU (amp: bf16 | fp16 | none); the CPU runs fp32."""
    enabled = device.type == "cuda" and amp != "none"
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16, enabled=enabled)
