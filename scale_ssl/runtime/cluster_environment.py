"""Where this process sits in the job, as told by the launcher (torchrun, SLURM's srun,
``accelerate launch``, ``deepspeed``): read from the environment, never invented."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from scale_ssl.runtime.errors import LaunchError


@dataclass(frozen=True)
class ClusterEnvironment:
    """Where this process sits in the job, as told by the launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str

    @staticmethod
    def detect() -> "ClusterEnvironment":
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, accelerate launch, deepspeed
            return ClusterEnvironment(
                rank=int(env["RANK"]),
                world_size=int(env["WORLD_SIZE"]),
                local_rank=int(env.get("LOCAL_RANK", 0)),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", 29500)),
                source="torchrun",
            )
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # one srun task per process
            return ClusterEnvironment(
                rank=int(env["SLURM_PROCID"]),
                world_size=int(env["SLURM_NTASKS"]),
                local_rank=int(env.get("SLURM_LOCALID", 0)),
                master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                master_port=int(env.get("MASTER_PORT", 29500)),
                source="slurm",
            )
        raise LaunchError(
            "trainer.strategy=ddp needs a launcher that sets RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS): "
            "run `torchrun --nproc_per_node N -m scale_ssl fit ...`, or use trainer.strategy=single"
        )


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``gpu[003-006,010],cpu01`` -> ``gpu003``."""
    first = nodelist.split(",")[0]
    match = re.match(r"^([^\[]+)\[([0-9]+)", nodelist)
    if match:
        return match.group(1) + match.group(2)
    return first
