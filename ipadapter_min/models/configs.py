"""The architecture numbers of every model: the shapes a checkpoint format describes and a model
is built from.

They live apart from the models so that the format readers (``ipadapter_min.formats``) can turn
a downloaded file's config into ours without importing any model class. The defaults are SD1.5's
(UNet, VAE, CLIP ViT-L/14 text encoder) and OpenCLIP ViT-H/14's (image encoder).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels whose blocks have a transformer
    heads: int = 8
    context_dim: int = 768
    groups: int = 32

    @property
    def time_dim(self) -> int:
        return 4 * self.channels


@dataclass
class ControlNetConfig:
    """A ControlNet: a copy of its UNet's first half (``unet``; SD1.5's by default) plus the hint
    encoder that brings the control image (``conditioning_channels``, at pixel size) down to latent
    size through ``hint_channels``. ``global_pool``: its residuals are averaged over the image
    (the shuffle model), and it runs as in guess mode."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)
    conditioning_channels: int = 3
    global_pool: bool = False


@dataclass(frozen=True)
class T2IAdapterConfig:
    """A T2I-Adapter for SD1.5: full (sketch, canny, depth, …) or light (color)."""
    light: bool = False
    in_channels: int = 3  # 1 for the sketch and canny adapters (grayscale control images)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # SD1.5's level widths
    res_blocks: int = 2  # residual blocks per level: 2 (full), 4 (light)
    unshuffle: int = 8  # pixels → latent size


@dataclass
class VAEConfig:
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks: int = 2
    latent_channels: int = 4
    image_channels: int = 3
    groups: int = 32
    scaling_factor: float = 0.18215


@dataclass
class TextEncoderConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    layer_norm_eps: float = 1e-5


CONTEXT_DIM = 768  # SD1.5's cross-attention (text-token) width
VIT_H = "ViT-H/14"  # OpenCLIP ViT-H/14: width 1280, projection 1024, 257 tokens at 224 px
VIT_BIGG = "ViT-bigG/14"  # OpenCLIP ViT-bigG/14: width 1664, projection 1280
VIT_H_WIDTH, VIT_H_PROJECTION, VIT_BIGG_PROJECTION = 1280, 1024, 1280
VIT_H_TOKENS = 257  # 16×16 patches + class token


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Shape of a CLIP vision tower. The defaults are OpenCLIP ViT-H/14 (laion2b)."""

    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_width: int = 5120
    patch_size: int = 14
    image_size: int = 224
    proj_dim: int = 1024
    layer_norm_eps: float = 1e-5
    act: str = "gelu"  # "gelu" (OpenCLIP) or "quick_gelu" (OpenAI CLIP)

    def __post_init__(self):
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', not {self.act!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def vit_h_14(cls) -> "ImageEncoderConfig":
        return cls()

    @classmethod
    def vit_bigg_14(cls) -> "ImageEncoderConfig":
        return cls(width=1664, layers=48, heads=16, mlp_width=8192, proj_dim=1280)

    @classmethod
    def tiny(cls) -> "ImageEncoderConfig":
        """A few-layer model with the real token count (257), for fast tests."""
        return cls(width=64, layers=3, heads=4, mlp_width=128, proj_dim=32)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def name(self) -> str:
        for name, preset in (("ViT-H/14", self.vit_h_14()), ("ViT-bigG/14", self.vit_bigg_14())):
            if self == preset:
                return name
        return "custom"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ImageEncoderConfig":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ResamplerConfig:
    """The plus / plus-face resampler (official ``Resampler(dim=768, depth=4, dim_head=64, heads=12,
    num_queries=16, embedding_dim=1280, output_dim=768, ff_mult=4)``)."""
    dim: int = 768
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = VIT_H_WIDTH
    output_dim: int = CONTEXT_DIM
    ff_mult: int = 4


def encoder_name(feature_dim: int, encoder_output: str) -> str:
    """The image encoder whose output of this width an adapter consumes: the releases' ViT-H/14
    or ViT-bigG/14, or else one named by the width (a model of our own, e.g. a small demo)."""
    known = {("image_embeds", VIT_H_PROJECTION): VIT_H, ("image_embeds", VIT_BIGG_PROJECTION): VIT_BIGG,
             ("penultimate", VIT_H_WIDTH): VIT_H}
    return known.get((encoder_output, feature_dim), f"custom {feature_dim}-wide")


@dataclass(frozen=True)
class AdapterSpec:
    """What an IP-Adapter file needs, read from its image-projection keys and shapes.

    variant: "base" (also _light: same shapes), "vit-g", "plus" (also plus-face), "full-face".
    encoder: the image encoder it was trained with (``VIT_H``, ``VIT_BIGG`` or :func:`encoder_name`'s
        "custom …-wide").
    encoder_output: "image_embeds" (the projected embedding, (B, feature_dim)) or "penultimate"
        (hidden states of the last-but-one layer before post-LayerNorm, (B, 257, feature_dim)).
    feature_dim: the width the projection consumes.
    tokens: image tokens per reference image.
    context_dim: the image tokens' width, which must be the UNet's cross-attention (text-token) width.
    """
    variant: str
    encoder: str
    encoder_output: str
    feature_dim: int
    tokens: int
    context_dim: int = CONTEXT_DIM
    resampler: ResamplerConfig | None = field(default=None, repr=False)

    @classmethod
    def on_embedding(cls, feature_dim: int, tokens: int = 4, context_dim: int = CONTEXT_DIM) -> "AdapterSpec":
        """The base architecture (Linear + LayerNorm on the projected embedding) for an embedding of
        this width; on ViT-bigG/14's (1280) it is the vit-G adapter, as the releases name it."""
        variant = "vit-g" if feature_dim == VIT_BIGG_PROJECTION else "base"
        return cls(variant, encoder_name(feature_dim, "image_embeds"), "image_embeds", feature_dim, tokens, context_dim)

    @property
    def uses_hidden_states(self) -> bool:
        return self.encoder_output == "penultimate"
