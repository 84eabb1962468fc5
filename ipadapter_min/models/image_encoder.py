"""The IP-Adapter image encoder: OpenCLIP ViT-H/14 (or ViT-bigG/14 for the vit-G adapter).

The network is open_clip's own ``VisionTransformer``; ``loading`` builds it on the meta device
and gives it the loaded tensors, so loading never runs a random init.
:meth:`ImageEncoder.forward` returns what the adapters consume: the projected pooled embedding
(transformers' ``image_embeds``; base, light and vit-G adapters) and the penultimate hidden
states (transformers' ``hidden_states[-2]``; plus and full-face adapters).

Files accepted by :func:`load_image_encoder`: the transformers ``CLIPVisionModelWithProjection``
folder the IP-Adapter release ships (``models/image_encoder``, ``sdxl_models/image_encoder``),
its weights file alone, and the project's converted single file
(``python -m weights_convert image-encoder``).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .configs import ImageEncoderConfig

def import_open_clip():
    """open_clip's building blocks, imported on first use (``import open_clip`` takes seconds).

    The forward below runs the residual blocks on [batch, tokens, width], as open_clip's
    transformer does from 2.26.1 on; before, it ran them sequence-first, and an older open_clip
    would give wrong embeddings without an error (seen with 2.24.0)."""
    import inspect
    from importlib.metadata import version

    from open_clip.transformer import LayerNorm, QuickGELU, Transformer, VisionTransformer

    if "batch_first" not in inspect.signature(Transformer.__init__).parameters:
        raise RuntimeError(f"open_clip_torch {version('open_clip_torch')} is too old: the image encoder needs 2.26.1 or later "
                          f"(a batch-first transformer); pip install 'open_clip_torch>=2.26.1'")
    return LayerNorm, QuickGELU, VisionTransformer


class ImageEncoder(nn.Module):
    """open_clip's VisionTransformer under ``self.visual`` (state-dict keys ``visual.*``, as in
    open_clip's own checkpoints), with a forward that returns both outputs in one pass."""

    def __init__(self, config: ImageEncoderConfig = ImageEncoderConfig()):
        super().__init__()
        LayerNorm, QuickGELU, VisionTransformer = import_open_clip()
        self.config = config
        self.visual = VisionTransformer(
            image_size=config.image_size,
            patch_size=config.patch_size,
            width=config.width,
            layers=config.layers,
            heads=config.heads,
            mlp_ratio=config.mlp_width / config.width,
            output_dim=config.proj_dim,
            act_layer=QuickGELU if config.act == "quick_gelu" else nn.GELU,
            norm_layer=partial(LayerNorm, eps=config.layer_norm_eps),
        )
        if self.visual.transformer.resblocks[0].mlp.c_fc.out_features != config.mlp_width:
            raise ValueError(f"open_clip rounded the MLP width of {config} differently")

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(pixels.to(device=self.device, dtype=self.dtype))  # (B, width, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g·g, width): one token per patch
        cls_token = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls_token, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, 3, S, S] (normalized: ``clip_preprocess.preprocess``) →
        (image_embeds [B, proj_dim], penultimate hidden states [B, tokens, width])."""
        penultimate = self.penultimate(pixels)
        x = self.visual.transformer.resblocks[-1](penultimate)
        pooled = self.visual.ln_post(x[:, 0])  # post-LN of the class token only
        return pooled @ self.visual.proj, penultimate

    def penultimate(self, pixels: torch.Tensor) -> torch.Tensor:
        """Only the penultimate hidden states (what plus / full-face adapters use): the last layer
        is not run."""
        x = self._embed(pixels)
        for block in self.visual.transformer.resblocks[:-1]:
            x = block(x)
        return x
