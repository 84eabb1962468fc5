"""CLIP scores for evaluating image prompts, as in the IP-Adapter paper (CLIP ViT-L/14):

    CLIP-I = cos(CLIP image embedding of the generated image, that of the prompt image)
    CLIP-T = cos(CLIP image embedding of the generated image, CLIP text embedding of a caption)

Plain cosines (0..1 in practice; torchmetrics' ``CLIPScore`` reports 100·cos). The model is
open_clip's ``CLIP``, built from an architecture name (``ViT-L-14``, ``ViT-L-14-quickgelu`` for
OpenAI's weights, ``ViT-H-14``) or an open_clip config JSON, and given the weights of a file the
user downloaded (``open_clip_pytorch_model.bin`` or ``.safetensors``): nothing is downloaded,
and a file that does not fit is refused naming its first bad key or shape.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..formats.files import Checkpoint, one_line, read_state_dict
from ..loading.checked import assign, build_checked
from ..models.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess

DEFAULT_MODEL = "ViT-L-14"
CONFIG_BESIDE_WEIGHTS = "open_clip_config.json"  # what open_clip repositories on the hub ship


def model_config(name: str | os.PathLike | None, weights: str | os.PathLike) -> tuple[dict, str]:
    """(open_clip model config, where it came from). ``name``: an open_clip architecture name or
    a config JSON file (``{"embed_dim", "vision_cfg", "text_cfg"}``, or an ``open_clip_config.json``
    with them under ``model_cfg``). None: the ``open_clip_config.json`` beside the weights when
    there is one (it says e.g. whether the weights need QuickGELU), else ``ViT-L-14``."""
    if name is None:
        beside = Path(weights).parent / CONFIG_BESIDE_WEIGHTS
        name = beside if beside.is_file() else DEFAULT_MODEL
    path = Path(name)
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable open_clip config JSON ({one_line(exc)})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected an open_clip config JSON object, got a {type(data).__name__}")
        config = data.get("model_cfg", data)
        if not isinstance(config, dict):
            raise ValueError(f"{path}: \"model_cfg\" is not a JSON object")
        _check_normalization(data.get("preprocess_cfg", config.get("preprocess_cfg", {})), path)
        source = str(path)
    else:
        import open_clip

        config = open_clip.get_model_config(str(name))
        if config is None:
            raise ValueError(f"{str(name)!r} is neither an open_clip architecture name (e.g. ViT-L-14, "
                             f"ViT-L-14-quickgelu, ViT-H-14) nor a config JSON file")
        source = str(name)
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(f"open_clip config {source}: no {missing[0]!r} key")
    return config, source


def _check_normalization(preprocess_cfg: dict, source: Path) -> None:
    """Images are normalized with OpenAI's mean and std (what CLIP ViT-L/14 and ViT-H/14 use)."""
    for key, expected in (("mean", OPENAI_CLIP_MEAN), ("std", OPENAI_CLIP_STD)):
        value = preprocess_cfg.get(key, expected)
        if len(value) != 3 or any(abs(a - b) > 1e-6 for a, b in zip(value, expected)):
            raise ValueError(f"{source}: preprocess_cfg {key} {value} is not OpenAI CLIP's {list(expected)}")


class CLIPScorer:
    """An open_clip CLIP model and its tokenizer; embeddings come back L2-normalized.
    ``architecture`` says where the model's config came from (a name or a JSON file)."""

    def __init__(self, model: torch.nn.Module, tokenizer, image_size: int, architecture: str):
        self.model, self.tokenizer, self.image_size, self.architecture = model, tokenizer, image_size, architecture

    @classmethod
    def from_file(cls, weights: str | os.PathLike, name: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "CLIPScorer":
        """``weights``: an OpenCLIP checkpoint (state-dict keys of ``open_clip.CLIP``: visual.*,
        transformer.*, token_embedding, …); ``name``: see :func:`model_config`."""
        config, source = model_config(name, weights)
        image_size = config["vision_cfg"].get("image_size", 224)
        if isinstance(image_size, (list, tuple)):
            if len(set(image_size)) != 1:
                raise ValueError(f"open_clip config {source}: non-square image_size {image_size} is not supported")
            image_size = image_size[0]
        from open_clip.model import CLIP
        from open_clip.tokenizer import SimpleTokenizer

        state = read_state_dict(weights)
        if state and all(k.startswith("module.") for k in state):  # saved from open_clip's DDP training
            state = {k[len("module."):]: v for k, v in state.items()}
        if "logit_scale" in state and state["logit_scale"].numel() == 1:  # some files store it as [1]; unused here
            state["logit_scale"] = state["logit_scale"].reshape(())
        kwargs = {k: config[k] for k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu") if k in config}

        def build() -> CLIP:
            try:
                return CLIP(**kwargs)
            except Exception as exc:  # open_clip refusing the config: TypeError, AssertionError, …
                raise ValueError(f"open_clip config {source}: open_clip cannot build a CLIP from it "
                                 f"({one_line(exc)})") from None

        checkpoint = Checkpoint(state, str(weights))
        model = assign(build_checked(build, checkpoint, f"an open_clip {source} CLIP"), checkpoint, device, dtype)
        if model.attn_mask is not None:  # a non-persistent buffer: no file has it, the meta build left it empty
            n = model.attn_mask.shape[0]
            model.attn_mask = torch.full((n, n), float("-inf"), device=device).triu_(1)
        tokenizer = SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))
        return cls(model, tokenizer, image_size, source)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, embed_dim]: shortest side to the model's size (bicubic), centre crop, OpenAI mean/std."""
        pixels = preprocess(list(images), size=self.image_size).to(self.device, self.model.visual.conv1.weight.dtype)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, embed_dim]; texts longer than the context are truncated (open_clip's tokenizer)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def clip_i(self, generated: Sequence[Image.Image], prompt_images: Sequence[Image.Image]) -> torch.Tensor:
        """[N] cosines of generated[j] with prompt_images[j] (or with a single prompt image for all)."""
        return (self.embed_images(generated) * self.embed_images(prompt_images)).sum(-1)

    def clip_t(self, generated: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        """[N] cosines of generated[j] with captions[j] (or with a single caption for all)."""
        return (self.embed_images(generated) * self.embed_texts(captions)).sum(-1)
