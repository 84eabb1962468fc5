"""Text-to-image with Stable Diffusion 1.5: prompt → text tokens → denoising loop (a sampler from
``samplers``: DDIM by default) with classifier-free guidance → VAE decode → RGB images.

The loop takes an optional cross-attention hook, which is how an IP-Adapter (or anything
else that changes cross-attention) joins in without this file knowing about it. The loop lays
out the CFG batch (``cfg.CFGBatch``) and tells the hook that layout (``hook.rows``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..loading.sd15 import load_sd15
from ..models.attention import CrossAttentionHook
from ..models.tokenizer import Tokenizer
from ..samplers import Sampler, make_sampler
from ..samplers.cfg import CFGBatch
from .controls import ControlNetInput, T2IAdapterInput
from .editing import Inpainting, noise, picture_start
from .image_processing import paste_back, size_of, to_images
from .long_prompts import pad_with_empty, prompt_ids


DEFAULT_SIZE = 512  # SD1.5's training resolution, the size without an init image


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {value}")


class StableDiffusion:
    """Load once, generate many."""

    def __init__(self, unet, vae, text_encoder, tokenizer: Tokenizer | None = None):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer = tokenizer or Tokenizer()

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  loras: Sequence[tuple[str | Path, float]] = (), vae: str | Path | None = None):
        """From a converted file, an original single-file checkpoint or a diffusers folder; ``loras``:
        (file, weight) pairs merged into the UNet and text encoder; ``vae``: a VAE file or folder
        instead of the checkpoint's own (``loading.load_sd15``)."""
        models = load_sd15(path, device=device, dtype=dtype, loras=loras, vae=vae)
        return cls(models["unet"], models["vae"], models["text_encoder"])

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    @torch.no_grad()
    def encode_prompt(self, prompt: str, clip_skip: int = 0, long_prompt: str = "truncate",
                      which: str = "prompt") -> torch.Tensor:
        """The text embedding [1, 77, width]; with ``long_prompt`` "chunk", [1, 77 · chunks, width]
        (``long_prompts``). ``which`` names the text in the warning about words truncation drops."""
        ids = prompt_ids(self.tokenizer, prompt, long_prompt, which).to(self.device)
        hidden = self.text_encoder(ids, clip_skip=clip_skip)
        return hidden.reshape(1, -1, hidden.shape[-1])  # (1, 77 · chunks, width): the chunks one after another

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, sampler: Sampler,
                guidance: float, hook: CrossAttentionHook | None = None, start: int = 0,
                inpainting: Inpainting | None = None, guides: Sequence = (), progress: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The sampler's loop (a fresh ``Sampler``, e.g. ``samplers.DDIM(steps)``) for the text
        embeddings of the prompt (``cond``) and of the negative prompt (``uncond``, unused when
        guidance ≤ 1), one each; the hook gets the batch's row layout. ``start``: how many of the
        sampler's steps to skip (img2img). ``guides``: structural controls, each giving the UNet
        residuals at every step, which add up. ``generator``: for samplers that add noise as they go."""
        batch = CFGBatch(latents.shape[0], guided=guidance > 1)
        context = batch.per_row(cond, uncond)
        if hook is not None:
            hook.rows = batch.rows
        runs = sampler.steps - start  # hooks and guides count the steps this run takes, as diffusers
        for i in tqdm(range(start, sampler.steps), desc="denoising", disable=not progress):
            t = sampler.timesteps[i]
            x, t_ = sampler.scale_input(batch.inputs(latents), i), t.to(self.device)
            if hook is not None:
                hook.set_step(i - start, runs, t.item())
            residuals = None
            for guide in guides:
                extra = guide.residuals(x, t_, context, batch, i - start, runs)
                residuals = extra if residuals is None else residuals + extra
            if inpainting is not None:
                x = inpainting.unet_input(x, batch)
            eps = self.unet(x, t_, context, hook, residuals)
            latents = sampler.step(batch.guide(eps, guidance), i, latents, generator)
            if inpainting is not None:
                latents = inpainting.keep_unmasked(latents, i + 1 if i + 1 < sampler.steps else None)
        return latents

    @torch.no_grad()
    def __call__(self, prompt: str, negative_prompt: str = "", steps: int = 30, guidance: float = 7.5, seed: int = 0,
                 width: int | None = None, height: int | None = None, num_images: int = 1, clip_skip: int = 0,
                 init_image: Image.Image | None = None, strength: float | None = None, mask: Image.Image | None = None,
                 mask_crop: int | None = None, controls: Sequence[ControlNetInput | T2IAdapterInput] = (),
                 hook: CrossAttentionHook | None = None, sampler: str = "ddim", eta: float = 0.0,
                 long_prompt: str = "truncate", progress: bool = True) -> list[Image.Image]:
        """Generate ``num_images`` images; guidance ≤ 1 turns classifier-free guidance off.
        ``sampler``: one of ``samplers.SAMPLERS`` (ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras),
        each giving diffusers' image with its scheduler of that name; ``eta``: DDIM's η.

        With ``init_image``, img2img: the picture noised by ``strength`` (default 0.8; 1 keeps
        little of it) is denoised. With a ``mask`` too (white = repaint), inpainting: only the
        white region changes (``strength`` default 1.0); ``mask_crop`` works on the mask's bounding
        box widened by that many pixels, at the output size, and pastes the result back into the
        picture. ``controls``: ControlNets and T2I-Adapters with their control images, whose
        residuals add up. ``long_prompt``: "truncate" (diffusers: tokens past CLIP's 75 are dropped,
        with a warning) or "chunk" (AUTOMATIC1111's chunks of 75; ``long_prompts``).
        Size: ``width`` × ``height``, by default the init image's or else the first control image's
        size rounded down to a multiple of 8, else 512 × 512 (diffusers' inpainting pipeline
        defaults to 512 × 512 always)."""
        if mask is not None and init_image is None:
            raise ValueError("a mask needs the init image it masks")
        if mask_crop is not None and mask.size != init_image.size:
            raise ValueError(f"a mask crop cuts the same box from the mask and the init image, so they must be the same "
                             f"size: the mask is {mask.width}×{mask.height}, the image {init_image.width}×{init_image.height}")
        picture = init_image if init_image is not None else controls[0].image if controls else None
        width, height = size_of(picture, width, height) if picture is not None else (width or DEFAULT_SIZE,
                                                                                     height or DEFAULT_SIZE)
        check_size(width, height)
        guides = [control.guide(width, height, self.device, self.dtype) for control in controls]
        if self.unet.cfg.in_channels != 4 and mask is None:
            raise ValueError(f"this UNet takes {self.unet.cfg.in_channels} input channels (an inpainting model): "
                             "give it an init image and a mask")
        cond = self.encode_prompt(prompt, clip_skip, long_prompt)
        # As in diffusers, clip_skip shapes the prompt's embedding only, not the negative prompt's.
        uncond = self.encode_prompt(negative_prompt, 0, long_prompt, "negative prompt") if guidance > 1 else None
        # Chunks: the shorter side is padded with the empty prompt, encoded as that side is (A1111).
        if uncond is not None and cond.shape[1] < uncond.shape[1]:
            cond = pad_with_empty(cond, uncond.shape[1], self.encode_prompt("", clip_skip))
        elif uncond is not None and uncond.shape[1] < cond.shape[1]:
            uncond = pad_with_empty(uncond, cond.shape[1], self.encode_prompt(""))
        sampling = make_sampler(sampler, steps, eta)
        generator = torch.Generator("cpu").manual_seed(seed)
        if init_image is None:
            latents = noise(generator, num_images, height, width) * sampling.init_noise_sigma
            start, inpainting, box = 0, None, None
        else:
            latents, start, inpainting, box = picture_start(self.vae, sampling, generator, init_image, mask, width,
                                                            height, num_images, strength, mask_crop,
                                                            self.unet.cfg.in_channels, self.device)
        latents = self.denoise(latents.to(self.device, self.dtype), cond, uncond, sampling, guidance, hook, start,
                               inpainting, guides, progress, generator)
        images = to_images(self.vae.decode(latents))
        if box is not None:
            images = [paste_back(image, init_image, mask, box) for image in images]
        return images
