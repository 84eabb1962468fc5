"""Build a model on the meta device, check a checkpoint's keys and shapes against it, assign the
tensors: the one way every loader here makes a model."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..formats.files import Checkpoint, CheckpointError, release

_INIT_FILLS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
               "xavier_normal_", "kaiming_uniform_", "kaiming_normal_")


@contextlib.contextmanager
def skip_init():
    """``torch.nn.init``'s fills do nothing for a while. Modules fill their weights as they are
    built; on the meta device there is nothing to fill, yet the first ``normal_`` there imports
    torch's decomposition machinery (sympy and ~900 modules: ~150 MB and seconds), for weights
    that the checkpoint replaces anyway. (diffusers and transformers skip them the same way.)"""
    saved = {name: getattr(nn.init, name) for name in _INIT_FILLS}
    try:
        for name in _INIT_FILLS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fill in saved.items():
            setattr(nn.init, name, fill)


def build_checked(build: Callable[[], nn.Module], checkpoint: Checkpoint, what: str, prefix: str = "") -> nn.Module:
    """``build()`` on the meta device, and the checkpoint's tensors under ``prefix`` checked
    against it: a one-line CheckpointError names the first unexpected, mis-shaped or missing key."""
    with torch.device("meta"), skip_init():
        model = build()
    expected = {prefix + k: v.shape for k, v in model.state_dict().items()}
    for key, value in checkpoint.tensors.items():
        if not key.startswith(prefix):
            continue
        if key not in expected:
            raise CheckpointError(f"{checkpoint.where(key)} is unexpected for {what}")
        if value.shape != expected[key]:
            raise CheckpointError(f"{checkpoint.where(key)} has shape {list(value.shape)}, expected "
                                  f"{list(expected[key])} for {what}")
    missing = [k for k in expected if k not in checkpoint.tensors]
    if missing:
        raise CheckpointError(f"{checkpoint.source}: missing key {checkpoint.file_key(missing[0])!r} for {what} "
                              f"({len(missing)} missing in all)")
    return model


def assign(model: nn.Module, checkpoint: Checkpoint, device, dtype, prefix: str = "") -> nn.Module:
    """Move the (checked) tensors under ``prefix`` out of the checkpoint into ``model``'s
    parameters, cast one at a time so that each source is freed before the next is read."""
    state = {}
    for key in [k for k in checkpoint.tensors if k.startswith(prefix)]:
        source = checkpoint.tensors.pop(key)
        target = source.to(device=device, dtype=dtype if source.is_floating_point() else source.dtype)
        if target is not source:
            release(source)
        state[key[len(prefix):]] = target
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def refuse_leftovers(checkpoint: Checkpoint, prefixes: list[str], what: str) -> None:
    """Keys that belong to none of the models being loaded."""
    for key in checkpoint.tensors:
        if not key.startswith(tuple(prefixes)):
            raise CheckpointError(f"{checkpoint.where(key)} is unexpected for {what}")
