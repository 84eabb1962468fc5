"""Reference (diffusers / transformers) SD1.5 models with random weights, written in the real
file formats, for parity tests. Test-only: this is where the oracles are imported."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import torch

FULL = "full"
TINY = "tiny"


def unet_kwargs(size: str) -> dict:
    if size == FULL:  # diffusers' defaults are SD1.5's, except the text width
        return dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    return dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                attention_head_dim=2, sample_size=16,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def vae_kwargs(size: str) -> dict:
    widths = (128, 256, 512, 512) if size == FULL else (16, 16, 32, 32)  # four levels: latents at 1/8
    return dict(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
                up_block_types=("UpDecoderBlock2D",) * len(widths), layers_per_block=2 if size == FULL else 1,
                latent_channels=4, norm_num_groups=32 if size == FULL else 8, sample_size=512)


def text_kwargs(size: str) -> dict:
    width, mlp, layers, heads = (768, 3072, 12, 12) if size == FULL else (32, 37, 2, 4)
    return dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=width,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights quickly: U(±1/√fan_in) for weights and biases (the scale of PyTorch's default
    init, so activations stay in a sane range), and norm scales/offsets near 1 and 0 but not equal,
    so that a swapped or missing norm parameter shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            bound = 1 / math.sqrt(p[0].numel())
            p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def make_unet(size: str, seed: int = 0):
    from diffusers import UNet2DConditionModel
    return randomize_(UNet2DConditionModel(**unet_kwargs(size)), seed).eval()


def make_vae(size: str, seed: int = 1):
    from diffusers import AutoencoderKL
    return randomize_(AutoencoderKL(**vae_kwargs(size)), seed).eval()


def make_text_encoder(size: str, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel
    return randomize_(CLIPTextModel(CLIPTextConfig(**text_kwargs(size))), seed).eval()


def ddim_scheduler():
    """SD1.5's scheduler settings (the model repo's scheduler_config.json), as DDIM."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def clip_tokenizer(folder: Path):
    """transformers' CLIPTokenizer built from open_clip's BPE vocabulary (what SD1.5 ships)."""
    from transformers import CLIPTokenizer
    import importlib.util
    bpe = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs + [256 + n for n in range(256 - len(bs))]  # GPT-2's byte-to-unicode table
    byte_chars = [chr(c) for c in cs]  # open_clip's order: printable bytes first, then the rest
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def save_diffusers_folder(folder: Path, unet, vae, text_encoder) -> Path:
    """The layout of a diffusers model repository (model_index.json and one folder a component)."""
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def diffusers_pipeline(unet, vae, text_encoder, tokenizer):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
