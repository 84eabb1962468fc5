"""Where this process is in a torchrun launch: one process group, started once, for the command
lines that share their work out (training's DistributedDataParallel, evaluation's pairs)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Processes:
    """rank / world_size / device; world_size 1 (and no process group) without torchrun."""
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def start(cls, device: str | None = None) -> "Processes":
        """The device: ``device``, else CUDA when there is one (cuda:LOCAL_RANK under torchrun),
        else the CPU. The process group: NCCL on CUDA, gloo on the CPU."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        chosen = torch.device(device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available here (use --device cpu)")
        if chosen.type == "cuda" and world_size > 1 and chosen.index is None:
            chosen = torch.device("cuda", local)
        if world_size == 1:
            return cls(0, 1, chosen)
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
        return cls(dist.get_rank(), world_size, chosen)

    @property
    def main(self) -> bool:
        """The process that writes files and shows progress."""
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> float:
        """The mean over processes of a scalar tensor on this process's device."""
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value.item()

    def total(self, count: int) -> int:
        if self.world_size == 1:
            return count
        value = torch.tensor([count], dtype=torch.float64, device=self.device)
        dist.all_reduce(value)
        return int(value.item())

    def gather(self, items: list) -> list:
        """Every process's list, concatenated in rank order, on the main process ([] elsewhere)."""
        if self.world_size == 1:
            return items
        parts = [None] * self.world_size if self.main else None
        dist.gather_object(items, parts, dst=0)
        return [item for part in parts or [] for item in part]

    @staticmethod
    def stop() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
