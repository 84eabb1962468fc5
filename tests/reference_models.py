"""Reference (diffusers / transformers) SD1.5 models with random weights, written in the real
file formats, for parity tests. Test-only: this is where the oracles are imported."""
from __future__ import annotations

import functools
import gc
import gzip
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from ipadapter_min.models.configs import ImageEncoderConfig

FULL = "full"
TINY = "tiny"
SMALL = "small"  # SD1.5's structure (all 16 cross-attention layers, 768-wide text) at a tenth of the width: training


def unet_kwargs(size: str) -> dict:
    if size == FULL:  # diffusers' defaults are SD1.5's, except the text width
        return dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    if size == SMALL:
        return dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=8, cross_attention_dim=768,
                    attention_head_dim=8, sample_size=8)
    return dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                attention_head_dim=2, sample_size=16,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def vae_kwargs(size: str) -> dict:
    widths = (128, 256, 512, 512) if size == FULL else (16, 16, 32, 32)  # four levels: latents at 1/8
    return dict(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
                up_block_types=("UpDecoderBlock2D",) * len(widths), layers_per_block=2 if size == FULL else 1,
                latent_channels=4, norm_num_groups=32 if size == FULL else 8, sample_size=512)


def text_kwargs(size: str) -> dict:
    width, mlp, layers, heads = {FULL: (768, 3072, 12, 12), SMALL: (768, 64, 1, 12)}.get(size, (32, 37, 2, 4))
    return dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=width,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def fill_parameters_(module: torch.nn.Module, seed: int, fill) -> torch.nn.Module:
    """Every parameter of ``module`` set in place by ``fill(name, parameter, generator)``, each
    from its own generator (seeded from ``seed`` and the parameter's place in the module), so that
    every core fills some. Most of the time is the first touch of the fresh memory, which runs in
    parallel (measured: 3.5 GB of parameters in 7.2-10.8 s on one thread, 4.1 s on two)."""
    def fill_one(item):
        index, (name, p) = item
        with torch.no_grad():  # per thread
            fill(name, p, torch.Generator().manual_seed(seed * 100_000 + index))

    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill_one, enumerate(module.named_parameters())))
    return module


def default_init_(name: str, p: torch.nn.Parameter, g: torch.Generator) -> None:
    """U(±1/√fan_in) for weights and biases (the scale of PyTorch's default init, so activations
    stay in a sane range), and norm scales/offsets near 1 and 0 but not equal, so that a swapped
    or missing norm parameter shows."""
    if p.dim() >= 2:
        bound = 1 / math.sqrt(p[0].numel())
        p.uniform_(-bound, bound, generator=g)
    elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    else:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights quickly (default_init_), in place."""
    return fill_parameters_(module, seed, default_init_)


def make_unet(size: str, seed: int = 0, in_channels: int = 4):
    """``in_channels`` 9: an inpainting UNet (latents, mask, masked image's latents)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.modeling_utils import no_init_weights
    with no_init_weights():  # randomize_ sets every parameter: skip the (slow) default init
        return randomize_(UNet2DConditionModel(**unet_kwargs(size), in_channels=in_channels), seed).eval()


def make_vae(size: str, seed: int = 1):
    from diffusers import AutoencoderKL
    from diffusers.models.modeling_utils import no_init_weights
    with no_init_weights():
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
    assert len(vocab) == len(set(vocab)) == 49408
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


def write_diffusers_folder(folder: Path, size: str) -> Path:
    """save_diffusers_folder with one model in memory at a time: each is built, written and dropped."""
    for part, make in (("unet", make_unet), ("vae", make_vae), ("text_encoder", make_text_encoder)):
        model = make(size)
        model.save_pretrained(folder / part)
        del model
        gc.collect()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def from_folder(cls, folder: Path):
    """A reference model read back by its own library (diffusers' or transformers' from_pretrained),
    every weight from the file: nothing missing (randomly initialised), unexpected or mis-shaped.
    (Without accelerate, diffusers builds the model with its init functions skipped and copies
    the file's tensors in; it warns each time unless told not to try.)"""
    import importlib.util
    kwargs = {}
    if cls.__module__.startswith("diffusers."):
        kwargs["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    assert not problems and not info.get("error_msgs"), f"{folder}: {info}"
    return model.eval()


def load_unet(folder: Path):
    from diffusers import UNet2DConditionModel
    return from_folder(UNet2DConditionModel, folder / "unet")


def load_vae(folder: Path):
    from diffusers import AutoencoderKL
    return from_folder(AutoencoderKL, folder / "vae")


def load_text_encoder(folder: Path):
    from transformers import CLIPTextModel
    return from_folder(CLIPTextModel, folder / "text_encoder")


def load_hf_image_encoder(folder: Path):
    from transformers import CLIPVisionModelWithProjection
    return from_folder(CLIPVisionModelWithProjection, folder)


def diffusers_pipeline(unet, vae, text_encoder, tokenizer, image_encoder=None, feature_extractor=None,
                       kind: str = "StableDiffusionPipeline"):
    """``kind``: StableDiffusionPipeline, StableDiffusionImg2ImgPipeline or StableDiffusionInpaintPipeline."""
    import diffusers
    return getattr(diffusers, kind)(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=feature_extractor,
                                   image_encoder=image_encoder, requires_safety_checker=False)


# Widths of the official keys ip_adapter.<n>.to_{k,v}_ip.weight (reference-facts.md): processors
# counted down blocks → up blocks → mid block.
OFFICIAL_WIDTHS = {1: 320, 3: 320, 5: 640, 7: 640, 9: 1280, 11: 1280, 13: 1280, 15: 1280, 17: 1280,
                   19: 640, 21: 640, 23: 640, 25: 320, 27: 320, 29: 320, 31: 1280}


# ---------------------------------------------------------------------------------------------
# IP-Adapter: random weights in the official formats (key names and shapes from the official code)

def projection_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    if variant in ("base", "light", "vit-g"):
        embed = 1280 if variant == "vit-g" else 1024
        return {"proj.weight": (3072, embed), "proj.bias": (3072,), "norm.weight": (768,), "norm.bias": (768,)}
    if variant == "full-face":
        return {"proj.0.weight": (1280, 1280), "proj.0.bias": (1280,), "proj.2.weight": (768, 1280),
                "proj.2.bias": (768,), "proj.3.weight": (768,), "proj.3.bias": (768,)}
    assert variant == "plus"
    shapes = {"latents": (1, 16, 768), "proj_in.weight": (768, 1280), "proj_in.bias": (768,),
              "proj_out.weight": (768, 768), "proj_out.bias": (768,),
              "norm_out.weight": (768,), "norm_out.bias": (768,)}
    for i in range(4):
        for norm in ("norm1", "norm2"):
            shapes[f"layers.{i}.0.{norm}.weight"] = shapes[f"layers.{i}.0.{norm}.bias"] = (768,)
        shapes.update({f"layers.{i}.0.to_q.weight": (768, 768), f"layers.{i}.0.to_kv.weight": (1536, 768),
                       f"layers.{i}.0.to_out.weight": (768, 768), f"layers.{i}.1.0.weight": (768,),
                       f"layers.{i}.1.0.bias": (768,), f"layers.{i}.1.1.weight": (3072, 768),
                       f"layers.{i}.1.3.weight": (768, 3072)})
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.empty(shape)
        if len(shape) >= 2:  # U(±1/√fan_in), like PyTorch's default init
            t.uniform_(-1 / math.sqrt(shape[-1]), 1 / math.sqrt(shape[-1]), generator=g)
        elif key.endswith(".weight") and ("norm" in key or key.endswith(("1.0.weight", "proj.3.weight"))):
            t.normal_(1, 0.1, generator=g)  # LayerNorm scales near 1 but not 1
        else:
            t.normal_(0, 0.05, generator=g)
        out[key] = t.to(dtype)
    return out


@functools.lru_cache
def _ip_part(widths: tuple[tuple[int, int], ...]) -> dict[str, torch.Tensor]:
    shapes = {f"{n}.to_{kv}_ip.weight": (w, 768) for n, w in widths for kv in "kv"}
    return random_tensors(shapes, 100, torch.float16)


def official_state(variant: str, seed: int = 0, widths: dict[int, int] = OFFICIAL_WIDTHS) -> dict[str, dict]:
    """{"image_proj": ..., "ip_adapter": ...} as the release stores it: fp16, the resampler fp32.
    (All variants share one random ip_adapter part: generating it takes a while.)"""
    proj_dtype = torch.float32 if variant == "plus" else torch.float16
    return {"image_proj": random_tensors(projection_shapes(variant), seed, proj_dtype),
            "ip_adapter": dict(_ip_part(tuple(widths.items())))}


def write_official(state: dict[str, dict], path) -> None:
    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file({f"{part}.{k}": v for part, tensors in state.items() for k, v in tensors.items()}, str(path))


# ---------------------------------------------------------------------------------------------
# Image encoder: transformers' CLIPVisionModelWithProjection (the release's image_encoder folder)

def hf_config(cfg: ImageEncoderConfig):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, patch_size=cfg.patch_size, image_size=cfg.image_size,
        projection_dim=cfg.proj_dim, hidden_act=cfg.act, layer_norm_eps=cfg.layer_norm_eps,
    )


def random_hf_model(cfg: ImageEncoderConfig, seed: int = 0):
    """A transformers model with random weights, without its (slow) init: built on the meta
    device, then filled uniformly (faster than normal_): matrices with std 1/√fan_in (so
    attention is not uniform and the class token depends on the image), vectors with std 0.02,
    LayerNorm weights around 1."""
    from transformers import CLIPVisionModelWithProjection
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(hf_config(cfg))
    model.to_empty(device="cpu")

    def fill(name: str, p: torch.nn.Parameter, g: torch.Generator) -> None:
        std = 1 / math.sqrt(p[0].numel()) if p.ndim >= 2 and "position" not in name else 0.02
        p.uniform_(-std * math.sqrt(3), std * math.sqrt(3), generator=g)
        if "norm" in name and name.endswith(".weight"):
            p.add_(1.0)

    fill_parameters_(model, seed, fill)
    with torch.no_grad():
        ids = model.vision_model.embeddings.position_ids  # a buffer that to_empty left garbage
        ids.copy_(torch.arange(ids.shape[-1]).expand_as(ids))
    return model.eval()


def sample_images() -> list[Image.Image]:
    """Non-square RGB images with structure and noise (deterministic)."""
    rng = np.random.default_rng(0)
    out = []
    for w, h in [(640, 480), (300, 517), (225, 1000), (100, 150), (1023, 224), (224, 224)]:
        x = np.linspace(0, 1, w)[None, :, None]
        y = np.linspace(0, 1, h)[:, None, None]
        a = 127.5 * (1 + np.sin(9 * x + 5 * y + np.arange(3))) + rng.normal(0, 25, (h, w, 3))
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


# ---------------------------------------------------------------------------------------------
# ControlNet: diffusers' ControlNetModel with random weights (its own defaults are SD1.5's)

def controlnet_kwargs(size: str) -> dict:
    keep = ("block_out_channels", "layers_per_block", "norm_num_groups", "cross_attention_dim", "attention_head_dim",
            "down_block_types")
    kwargs = {k: v for k, v in unet_kwargs(size).items() if k in keep}
    if size == TINY:
        kwargs["conditioning_embedding_out_channels"] = (8, 8, 16, 16)  # three halvings: pixels → latents
    return kwargs


def make_controlnet(size: str, seed: int = 20, **overrides):
    from diffusers import ControlNetModel
    from diffusers.models.modeling_utils import no_init_weights
    with no_init_weights():
        return randomize_(ControlNetModel(**{**controlnet_kwargs(size), **overrides}), seed).eval()
