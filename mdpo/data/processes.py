"""The processes a dataset is validated over: this one alone, or the ranks of the torch.distributed group
a launcher (torchrun, accelerate launch) and the run's engine made. Only what validation needs: a rank,
a world size, gathering objects to rank 0 or to every rank and broadcasting one from rank 0 (pickled,
over the group's backend: gloo on the CPU, NCCL between GPUs). Shared generation
(`mdpo.eval.generate.resolve_processes`) takes its defaults from here too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Processes":
        """The initialised torch.distributed group, else one process (torch imported only here)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's `obj`, in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process (pickled: for small objects)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every process."""
        return all(self.all_gather(bool(flag)))

    def range_of(self, n: int) -> range:
        """This process's contiguous share of n items (the first n % world processes take one more)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))
