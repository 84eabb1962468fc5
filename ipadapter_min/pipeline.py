"""Text-to-image with Stable Diffusion 1.5: prompt → text tokens → DDIM loop with
classifier-free guidance → VAE decode → RGB images.

The loop takes an optional cross-attention hook, which is how an IP-Adapter (or anything
else that changes cross-attention) joins in without this file knowing about it. The loop lays
out the CFG batch (``cfg.CFGBatch``) and tells the hook that layout (``hook.rows``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .attention import CrossAttentionHook
from .cfg import CFGBatch
from .ddim import DDIM
from .loading import load_sd15
from .tokenizer import Tokenizer


def initial_noise(seed: int, count: int, height: int, width: int) -> torch.Tensor:
    """Starting latents drawn exactly as diffusers draws them (float32, CPU generator), so the same
    seed gives the same image in both."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((count, 4, height // 8, width // 8), generator=generator, dtype=torch.float32)


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """VAE output in [-1, 1] → 8-bit RGB images (rescaled in the model's dtype, then rounded in
    float32, in diffusers' order, so fp16/bf16 images match the reference's too)."""
    array = ((pixels / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {value}")


class StableDiffusion:
    """Load once, generate many."""

    def __init__(self, unet, vae, text_encoder, tokenizer: Tokenizer | None = None, scheduler: DDIM | None = None):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer or Tokenizer()
        self.scheduler = scheduler or DDIM()

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """From a converted file, an original single-file checkpoint or a diffusers folder."""
        models = load_sd15(path, device=device, dtype=dtype)
        return cls(models["unet"], models["vae"], models["text_encoder"])

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    @torch.no_grad()
    def encode_prompt(self, prompt: str, clip_skip: int = 0) -> torch.Tensor:
        ids = self.tokenizer([prompt]).to(self.device)
        return self.text_encoder(ids, clip_skip=clip_skip)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, steps: int,
                guidance: float, hook: CrossAttentionHook | None = None, progress: bool = True) -> torch.Tensor:
        """The DDIM loop for the text embeddings of the prompt (``cond``) and of the negative prompt
        (``uncond``, unused when guidance ≤ 1), one each; the hook gets the batch's row layout."""
        batch = CFGBatch(latents.shape[0], guided=guidance > 1)
        context = batch.per_row(cond, uncond)
        if hook is not None:
            hook.rows = batch.rows
        for t in tqdm(self.scheduler.timesteps(steps), desc="denoising", disable=not progress):
            eps = self.unet(batch.inputs(latents), torch.tensor(t, device=self.device), context, hook)
            latents = self.scheduler.step(batch.guide(eps, guidance), t, latents, steps)
        return latents

    @torch.no_grad()
    def __call__(self, prompt: str, negative_prompt: str = "", steps: int = 30, guidance: float = 7.5, seed: int = 0,
                 width: int = 512, height: int = 512, num_images: int = 1, clip_skip: int = 0,
                 hook: CrossAttentionHook | None = None, progress: bool = True) -> list[Image.Image]:
        """Generate ``num_images`` images; guidance ≤ 1 turns classifier-free guidance off."""
        check_size(width, height)
        cond = self.encode_prompt(prompt, clip_skip)
        # As in diffusers, clip_skip shapes the prompt's embedding only, not the negative prompt's.
        uncond = self.encode_prompt(negative_prompt) if guidance > 1 else None
        latents = initial_noise(seed, num_images, height, width).to(self.device, self.dtype)
        latents = self.denoise(latents, cond, uncond, steps, guidance, hook, progress)
        return to_images(self.vae.decode(latents))
