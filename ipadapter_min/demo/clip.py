"""Stage 1: a CLIP for the demo world, trained contrastively (InfoNCE) on full captions.

Its image tower is the IP-Adapter's frozen image encoder (as OpenCLIP ViT-H/14 is for the real
adapters), its text tower the UNet's text encoder. Linear heads on both pooled embeddings also
predict the five attributes; they are thrown away after training, and are there because
contrastive learning alone learns colour in minutes but shape and position only slowly
(feasibility pilot: shape 27% after 300 steps), and the adapter needs all of them in the
image embedding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.clip_preprocess import preprocess
from ..models.image_encoder import ImageEncoder
from ..models.text_encoder import TextEncoder
from ..models.tokenizer import Tokenizer
from .batches import draw_scenes
from .models import IMAGE, TEXT
from .world import ATTRIBUTES, full_caption

TRAIN_TOKENS = 32  # captions are < 20 tokens; the text tower trains on 32 positions (attention is causal)


class DemoCLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = TextEncoder(TEXT)
        self.image = ImageEncoder(IMAGE)
        self.text_projection = nn.Linear(TEXT.width, IMAGE.proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.image_heads = nn.ModuleDict({a: nn.Linear(IMAGE.proj_dim, len(v)) for a, v in ATTRIBUTES.items()})
        self.text_heads = nn.ModuleDict({a: nn.Linear(IMAGE.proj_dim, len(v)) for a, v in ATTRIBUTES.items()})

    def text_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """Pooled at the first end-of-text token (the highest id), as CLIP pools."""
        hidden = self.text(ids)
        return self.text_projection(hidden[torch.arange(ids.shape[0]), ids.argmax(-1)])

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image(pixels)[0]


def clip_loss(model: DemoCLIP, tokenizer: Tokenizer, seed: int, step: int, batch: int) -> torch.Tensor:
    scenes, images, _ = draw_scenes(seed, step, batch)
    ids = tokenizer([full_caption(s) for s in scenes])
    image, text = model.image_embeds(preprocess(images, size=IMAGE.image_size)), model.text_embeds(ids)
    logits = model.logit_scale.exp().clamp(max=100) * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    targets = torch.arange(batch)
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    for name, values in ATTRIBUTES.items():
        labels = torch.tensor([values.index(s.attribute(name)) for s in scenes])
        loss = loss + 0.2 * (F.cross_entropy(model.image_heads[name](image), labels)
                             + F.cross_entropy(model.text_heads[name](text), labels))
    return loss


@torch.no_grad()
def zero_shot_accuracy(model: DemoCLIP, seed: int, count: int = 200) -> dict[str, float]:
    """Per attribute: how often the image's own full caption beats every caption that differs in
    that attribute alone (chance: 1 / number of values)."""
    tokenizer = Tokenizer(TRAIN_TOKENS)
    scenes, images, _ = draw_scenes(seed, 10**9, count)
    image = F.normalize(model.image_embeds(preprocess(images, size=IMAGE.image_size)), dim=-1)
    result = {}
    for name, values in ATTRIBUTES.items():
        right = 0
        for scene, embedding in zip(scenes, image):
            options = [v for v in values if name != "background" or v != scene.color]
            if name == "color":
                options = [v for v in values if v != scene.background]
            captions = [full_caption(_with(scene, name, v)) for v in options]
            text = F.normalize(model.text_embeds(tokenizer(captions)), dim=-1)
            right += options[int((text @ embedding).argmax())] == scene.attribute(name)
        result[name] = right / count
    return result


def _with(scene, name: str, value: str):
    from dataclasses import replace
    return replace(scene, **{name: value})


# Our text encoder's names → open_clip's text tower's (per layer, then the rest).
TEXT_LAYER_TO_OPEN_CLIP = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("self_attn.out_proj.", "attn.out_proj."),
                           ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]
TEXT_TO_OPEN_CLIP = [("embeddings.token_embedding.", "token_embedding."), ("final_layer_norm.", "ln_final.")]


def open_clip_checkpoint(text: dict[str, torch.Tensor], image: dict[str, torch.Tensor],
                         head: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """The demo CLIP in open_clip's ``CLIP`` layout, and its model config, from the demo's shipped
    parts (text encoder keys without ``text_encoder.``, image encoder keys ``visual.*``, and
    ``text_projection`` / ``logit_scale``): what ``python -m ipadapter_min.evaluate --clip`` reads."""
    state = dict(image)
    state["positional_embedding"] = text["embeddings.position_embedding.weight"]
    state["text_projection"] = head["text_projection"].T.contiguous()  # open_clip: x @ text_projection
    state["logit_scale"] = head["logit_scale"]
    for key, value in text.items():
        if key.startswith("encoder.layers."):
            index, rest = key[len("encoder.layers."):].split(".", 1)
            if rest.startswith("self_attn.") and rest[len("self_attn."):].startswith(("q_proj", "k_proj", "v_proj")):
                continue  # joined below
            rest = next((new + rest[len(old):] for old, new in TEXT_LAYER_TO_OPEN_CLIP if rest.startswith(old)), None)
            state[f"transformer.resblocks.{index}.{rest}"] = value
        elif key != "embeddings.position_embedding.weight":
            state[next(new + key[len(old):] for old, new in TEXT_TO_OPEN_CLIP if key.startswith(old))] = value
    for i in range(TEXT.layers):
        for kind in ("weight", "bias"):
            state[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [text[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
    config = {"embed_dim": IMAGE.proj_dim, "quick_gelu": True,
              "vision_cfg": {"image_size": IMAGE.image_size, "layers": IMAGE.layers, "width": IMAGE.width,
                             "patch_size": IMAGE.patch_size, "head_width": IMAGE.width // IMAGE.heads,
                             "mlp_ratio": IMAGE.mlp_width / IMAGE.width},
              "text_cfg": {"context_length": TEXT.max_positions, "vocab_size": TEXT.vocab_size, "width": TEXT.width,
                           "heads": TEXT.heads, "layers": TEXT.layers, "mlp_ratio": TEXT.mlp_width / TEXT.width}}
    return state, config
