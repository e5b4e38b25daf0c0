"""Multi-process launches from the command line: start the process group early, refuse launches that would
silently run one process, and tell rank 0 (the only one that writes files and prints) from the others.

``accelerate launch --cpu --num_processes N`` runs ONE process: with ``--cpu`` accelerate uses its simple launcher,
which starts several CPU processes only through ``mpirun`` (``--mpirun_hostfile``) and otherwise ignores
``--num_processes`` (it only sets ``MASTER_ADDR``/``MASTER_PORT``). N CPU processes (gloo) come from
``accelerate launch --multi_gpu --num_processes N`` or ``torchrun --nproc_per_node N`` with ``train.device=cpu``
(or on a machine without GPUs).
"""

from __future__ import annotations

import os

from nc_finetune.errors import UserError

# torch is imported inside the functions: the CLI asks for the launch rank before every command, and `validate`
# must not pay for (or need) torch.

_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def check_launch(env: dict[str, str] | None = None) -> None:
    """Refuse ``accelerate launch --cpu --num_processes N>1`` without mpirun (it starts one process, not N).

    Raises:
        UserError: the environment of that launch (accelerate's CPU flag and a rendezvous port, but no world size).
    """
    env = os.environ if env is None else env
    cpu_launch = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu_launch and "MASTER_PORT" in env and "WORLD_SIZE" not in env and not any(v in env for v in _MPI_SIZE_VARS):
        raise UserError("accelerate launch --cpu starts a single process, whatever --num_processes says (accelerate "
                        "starts several CPU processes only through mpirun); for N CPU processes use `accelerate "
                        "launch --multi_gpu --num_processes N -m nc_finetune.cli ...` or `torchrun --nproc_per_node N "
                        "-m nc_finetune.cli ...` with train.device=cpu")


def start_distributed(device: str) -> None:
    """Under torchrun / ``accelerate launch`` (``WORLD_SIZE`` > 1) initialise the process group now, so that the probe
    shards its data over the ranks; the trainer's ``Accelerator`` reuses the same state.

    Args:
        device: ``train.device``: ``cpu`` (or ``auto`` without CUDA) gives gloo, else the GPU backend.
    """
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    from accelerate import PartialState

    PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


def is_main_process() -> bool:
    """True on rank 0, and in a single process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def launch_rank() -> int:
    """The rank a launcher gave this process (``RANK``; 0 when not launched), known before any process group."""
    return int(os.environ.get("RANK", "0"))
