"""The sample command's image prompts: one group of flags per IP-Adapter.

Every ``--ip-adapter FILE`` starts a group, and the image-prompt flags after it belong to it:

    --ip-adapter ip-adapter-plus_sd15.bin --image-encoder models/image_encoder --image scene.png --scale 0.6 \\
    --ip-adapter ip-adapter-plus-face_sd15.bin --image-encoder models/image_encoder --image face.png \\
        --image-mask face-region.png --start 0.2

With one adapter (or none: the demo model's) they may stand anywhere, as they always could; with
several, an image-prompt flag before the first ``--ip-adapter`` is an error. Each group becomes a
namespace of the same parser, so each has every image-prompt option.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .configs import AdapterSpec
from .formats.files import CheckpointError, read_metadata, read_state_dict, save_safetensors

GROUP_DESTS = ("ip_adapter", "image_encoder", "image", "scale", "image_mask", "start", "end", "sigma_range",
               "weight_type", "composition_weight", "embeds_scaling", "image_combine", "negative_image",
               "negative_noise", "black_negative", "embeds", "save_embeds", "no_crop")
EMBEDS_FORMAT = "ipadapter_min.image_embeds"


def flag_spans(argv: list[str], parser: argparse.ArgumentParser) -> list[tuple[str | None, list[str]]]:
    """``argv`` cut into (dest, tokens) spans, one per option with its values (dest None for
    tokens no option claims)."""
    spans, i = [], 0
    while i < len(argv):
        token = argv[i]
        action = parser._option_string_actions.get(token.split("=", 1)[0]) if token.startswith("--") else None
        if action is None or "=" in token:
            spans.append((action.dest if action else None, [token]))
            i += 1
            continue
        end = i + 1
        if action.nargs in ("+", "*"):
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
        elif action.nargs != 0:
            end = i + 1 + (action.nargs if isinstance(action.nargs, int) else 1)
        spans.append((action.dest, argv[i:end]))
        i = end
    return spans


def split_groups(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[list[str]]]:
    """(the tokens of everything else, the tokens of each image-prompt group). With fewer than
    two ``--ip-adapter`` there is at most one group, wherever its flags stand."""
    spans = flag_spans(argv, parser)
    if sum(dest == "ip_adapter" for dest, _ in spans) < 2:
        return argv, []
    rest, groups = [], []
    for dest, tokens in spans:
        if dest == "ip_adapter":
            groups.append(list(tokens))
        elif dest in GROUP_DESTS:
            if not groups:
                raise ValueError(f"{tokens[0]} stands before the first --ip-adapter: with several adapters, each "
                                 "image-prompt flag follows the --ip-adapter it belongs to")
            groups[-1] += tokens
        else:
            rest += tokens
    return rest, groups


def parse(argv: list[str] | None, parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[argparse.Namespace]]:
    """(the command's arguments, one namespace per image-prompt group: the command's own when
    there is at most one adapter)."""
    rest, groups = split_groups(list(argv) if argv is not None else sys.argv[1:], parser)
    args = parser.parse_args(rest)
    return args, [parser.parse_args(group) for group in groups] or [args]


# ----------------------------------------------------------------------------------------------
# Precomputed image embeddings: diffusers' ip_adapter_image_embeds layout, with what made them


def save_image_embeds(path: Path, features: torch.Tensor, spec: AdapterSpec, encoder_name: str,
                      overwrite: bool = False) -> None:
    """(2, images, …) encoder features, negative first, with the adapter and encoder recorded."""
    metadata = {"format": EMBEDS_FORMAT, "adapter": json.dumps({"variant": spec.variant, "encoder": spec.encoder,
                                                                "encoder_output": spec.encoder_output,
                                                                "feature_dim": spec.feature_dim}),
                "image_encoder": encoder_name}
    save_safetensors({"image_embeds": features.detach().float().contiguous().cpu()}, path, metadata, overwrite)


def read_image_embeds(path: Path, spec: AdapterSpec) -> torch.Tensor:
    """Features saved by ``--save-embeds`` (or a one-tensor file of diffusers'
    ip_adapter_image_embeds), checked against the adapter that will use them."""
    tensors, metadata = read_state_dict(path), read_metadata(path)
    if len(tensors) != 1:
        raise CheckpointError(f"--embeds {path}: expected one tensor of image embeddings, found {len(tensors)}")
    (features,) = tensors.values()
    if metadata.get("format") == EMBEDS_FORMAT:
        made_for = recorded_adapter(path, metadata)
        wanted = {"encoder": spec.encoder, "encoder_output": spec.encoder_output, "feature_dim": spec.feature_dim}
        if any(made_for.get(k) != v for k, v in wanted.items()):
            raise CheckpointError(f"--embeds {path}: made for a {made_for['variant']} adapter ({made_for['encoder']} "
                                  f"{made_for['encoder_output']}), not this {spec.variant} one ({spec.encoder} "
                                  f"{spec.encoder_output})")
    expected_ndim = 4 if spec.uses_hidden_states else 3
    if features.ndim != expected_ndim or features.shape[0] != 2 or features.shape[-1] != spec.feature_dim:
        raise CheckpointError(f"--embeds {path}: shape {list(features.shape)}, expected (2, images, "
                              f"{'tokens, ' if spec.uses_hidden_states else ''}{spec.feature_dim}) for the "
                              f"{spec.variant} adapter, negative first")
    if not torch.isfinite(features).all():
        raise CheckpointError(f"--embeds {path}: the embeddings hold values that are not finite numbers")
    return features.float()


def recorded_adapter(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    """What the embeds file says it was made for: only compared with the adapter in use."""
    try:
        made_for = json.loads(metadata["adapter"])
    except (KeyError, json.JSONDecodeError, RecursionError):
        made_for = None
    if not (isinstance(made_for, dict) and all(isinstance(made_for.get(k), str) for k in
                                               ("variant", "encoder", "encoder_output"))):
        raise CheckpointError(f"--embeds {path}: its metadata 'adapter' is not the JSON --save-embeds writes")
    return made_for
