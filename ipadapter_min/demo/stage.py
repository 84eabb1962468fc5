"""One resumable training loop for every demo stage (CLIP, VAE, UNet, judge).

A stage is a set of trained modules, an AdamW optimizer and a ``loss(step)`` function that draws
its own batch from ``step`` alone (the data are rendered procedurally from a seed), so a stage
stopped at any checkpoint and resumed gives the run it would have given straight. Every
``save_every`` steps the modules and optimizer go to ``DIR/checkpoint.pt`` (atomically), and
each step's loss to ``DIR/log.csv``.
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats.files import write_atomically

CHECKPOINT = "checkpoint.pt"


def schedule(lr: float, steps: int, warmup: int = 200) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to a tenth: a function of the step, so nothing to save."""
    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr_at


def run_stage(name: str, folder: Path, modules: dict[str, nn.Module], loss: Callable[[int], torch.Tensor],
              steps: int, lr_at: Callable[[int], float], weight_decay: float = 0.0, save_every: int = 200,
              progress: bool = True, after_step: Callable[[int], None] | None = None) -> None:
    """Train ``modules`` for ``steps`` steps in all, going on from ``folder``'s checkpoint if any.
    ``after_step(step)`` runs after each optimizer step (e.g. an EMA update); its state must live
    in ``modules`` to be saved."""
    folder.mkdir(parents=True, exist_ok=True)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    # fused: one kernel over all parameters, a quarter of the time of the default on the CPU
    optimizer = torch.optim.AdamW(params, lr=lr_at(0), weight_decay=weight_decay, fused=True)
    start = 0
    if (folder / CHECKPOINT).is_file():
        state = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    log_path = folder / "log.csv"
    rows = [r for r in csv.DictReader(log_path.open())] if log_path.is_file() else []
    rows = [r for r in rows if int(r["step"]) <= start]
    write_atomically(log_path, lambda tmp: _write_rows(tmp, rows), overwrite=True)

    def save(step: int) -> None:
        state = {"step": step, "optimizer": optimizer.state_dict(),
                 "modules": {key: module.state_dict() for key, module in modules.items()}}
        write_atomically(folder / CHECKPOINT, lambda tmp: torch.save(state, tmp), overwrite=True)

    for module in modules.values():
        module.train()
    bar = tqdm(total=steps, initial=start, desc=name, unit="step", disable=not progress)
    started = time.perf_counter()
    with log_path.open("a") as log:
        writer = csv.writer(log)
        for step in range(start, steps):
            optimizer.zero_grad(set_to_none=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            value = loss(step)
            value.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            writer.writerow([step + 1, f"{value.item():.6f}", f"{time.perf_counter() - started:.1f}"])
            log.flush()
            bar.set_postfix(loss=f"{value.item():.4f}")
            bar.update(1)
            if (step + 1) % save_every == 0 or step + 1 == steps:
                save(step + 1)
    bar.close()
    for module in modules.values():
        module.eval()


def _write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "elapsed_seconds"])
        writer.writerows([r["step"], r["loss"], r["elapsed_seconds"]] for r in rows)


def step_rng(seed: int, step: int) -> torch.Generator:
    """A step's generator, a function of (seed, step) only (resumable)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)
