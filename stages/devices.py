"""Where a stage runs: the device its config names, and the torchrun process group around it."""
import os

import torch
import torch.distributed as dist


def pick_device(name: str, key: str) -> torch.device:
    """The device a stage's `key` (cpu | cuda | auto) names; auto is cuda when one is available."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key}: cuda requested but no CUDA device is available")
    return torch.device(name)


def init_distributed(device_name: str, key: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; CPU ranks use gloo, CUDA ranks
    nccl on cuda:LOCAL_RANK."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name, key)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device
