"""The processes an `mdpo-eval` command runs on: one, or several under `torchrun` / `accelerate launch`.

    procs = eval_processes()      # joins the launcher's process group (gloo on the CPU, NCCL on CUDA)
    procs.rank, procs.world, procs.device, procs.main
    ... generate.generate_answers shares its questions over the group by itself ...
    procs.finish()                # barrier + destroy_process_group (or the processes abort at exit)

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1 the
group is initialised here (unless the caller already did). Only `main` (rank 0) writes tables, metrics
and answers files; every process loads the model and generates its share.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class EvalProcesses:
    rank: int
    world: int
    device: torch.device | None  # None: the loader's default (CUDA when available)
    started_group: bool  # this object initialised the group (and so destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def finish(self) -> None:
        """Wait for every process, then leave the group this object started."""
        if self.world > 1 and self.started_group and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def eval_processes(device: str | None = None) -> EvalProcesses:
    """This process's place in the launcher's group (module docstring). `device`: the user's --device;
    by default each process of a CUDA machine takes GPU LOCAL_RANK, and the CPU otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return EvalProcesses(0, 1, torch.device(device) if device else None, False)
    started = False
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)  # NCCL's all_gather_object places objects on the current device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    chosen = torch.device("cuda", local) if use_cuda else torch.device(device or "cpu")
    return EvalProcesses(dist.get_rank(), dist.get_world_size(), chosen, started)
