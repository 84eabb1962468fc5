"""ipadapter_min: IP-Adapter on Stable Diffusion 1.5, written from scratch in PyTorch.

The public API is this package's top level; each name is imported on first use, so that
``python -m ipadapter_min.sample`` and ``import ipadapter_min`` load only what they run::

    from ipadapter_min import StableDiffusion, IPAdapterPipeline, load_sd15
"""
import importlib

# name → the module that defines it (tests/test_layers.py reads these as this file's imports)
_LAZY = {
    # pipelines: prompt (and reference images, init image, mask, controls) → images
    "StableDiffusion": ".pipelines.text_to_image",
    "IPAdapterPipeline": ".pipelines.image_prompts",
    "ImagePromptInput": ".pipelines.image_prompt_input",
    "ControlNetInput": ".pipelines.controls",
    "T2IAdapterInput": ".pipelines.controls",
    # loaders: any download format → checked models
    "load_sd15": ".loading.sd15",
    "load_vae": ".loading.sd15",
    "load_ip_adapter": ".loading.ip_adapter",
    "load_image_encoder": ".loading.ip_adapter",
    "load_controlnet": ".loading.controls",
    "load_t2i_adapter": ".loading.controls",
    # models and the pieces a custom runtime puts together
    "Tokenizer": ".models.tokenizer",
    "TextEncoder": ".models.text_encoder",
    "UNet": ".models.unet",
    "VAE": ".models.vae",
    "ImageEncoder": ".models.image_encoder",
    "ControlNet": ".models.controlnet",
    "T2IAdapter": ".models.t2i_adapter",
    "IPAdapter": ".ip_adapter.adapter",
    "image_prompt_tokens": ".ip_adapter.tokens",
    "make_sampler": ".samplers",
    "pack_convolutions": ".models.cpu_convolutions",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ipadapter_min' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # the next lookup finds it without this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
