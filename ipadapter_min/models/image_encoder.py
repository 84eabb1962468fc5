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
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .configs import ImageEncoderConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
        x = v.conv1(pixels.to(device=self.device, dtype=self.dtype))  # [B, width, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, width]
        cls_token = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, 3, S, S] (normalized, see :func:`preprocess`) →
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


# --------------------------------------------------------------------------------------------
# Preprocessing


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side at ``size``, long side truncated as transformers does."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess(images: Image.Image | Sequence[Image.Image], size: int = 224, crop: bool = True,
               backend: str = "torch") -> torch.Tensor:
    """PIL image(s) → normalized pixels [B, 3, size, size] float32 (on the CPU).

    crop=True (CLIPImageProcessor's default): shortest side → ``size`` (bicubic), center crop.
    crop=False: a plain ``size``×``size`` bicubic resize of the whole image (nothing cut away,
    the aspect ratio is not kept).

    backend="torch" resizes uint8 tensors with antialiased bicubic interpolation, exactly as
    transformers 5's default ``CLIPImageProcessor`` (torchvision backend) does, and so as
    diffusers' IP-Adapter pipelines do under transformers 5. backend="pil" resizes with PIL,
    exactly as ``CLIPImageProcessorPil`` (the transformers 4 default, which the official
    IP-Adapter code used). The two differ by at most a few uint8 levels on some pixels.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if backend not in ("torch", "pil"):
        raise ValueError(f"backend must be 'torch' or 'pil', not {backend!r}")
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    out = []
    for image in images:
        image = _to_rgb(image)
        width, height = image.size
        new_w, new_h = _shortest_side_size(width, height, size) if crop else (size, size)
        if backend == "pil":
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), Image.BICUBIC)
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        else:
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
            if (new_w, new_h) != (width, height):
                x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", antialias=True,
                                  align_corners=False)[0]
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[:, top:top + size, left:left + size].float()
        if backend == "pil":  # transformers' PIL path: rescale, then normalize
            out.append((x / 255 - mean) / std)
        else:  # its torchvision path fuses the two
            out.append((x - mean * 255) / (std * 255))
    return torch.stack(out)
