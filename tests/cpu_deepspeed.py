"""One-process torch.distributed on CPU for the DeepSpeed test scripts, without DeepSpeed's op builds."""

import os

import deepspeed


def init_cpu_distributed(port: str) -> None:
    """gloo, world size 1. DeepSpeed would compile its shared-memory collectives (a C++ op, about a
    minute on a fresh machine) at the first CPU init; one process never uses them, so the op is marked
    unusable and DeepSpeed runs on plain gloo, as CPU mode (openrlhf_gd2po/cpu.py) does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
