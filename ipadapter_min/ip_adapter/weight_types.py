"""ComfyUI_IPAdapter_plus's weight types: named presets of λ over SD1.5's 16 cross-attention
layers, so that a workflow's "style transfer" or "ease out" means the same here.

ComfyUI counts the layers in the order the UNet runs them (its ``transformer_index``: input
blocks 0–5, the middle block 6, output blocks 7–15), which is our layer numbering too. Three kinds:

* ramps over the layers: linear, ease in/out, ease in-out, reverse in-out;
* one part of the UNet weakened to 0.2: weak input/middle/output, strong middle;
* layer sets: style transfer, composition, …; a layer outside the set gets no image at all.

The two "precise" types also move the image tokens to the unconditional rows at some layers and
give the conditional rows nothing there: classifier-free guidance then steers away from what
those layers would take from the image (``LayerWeights.swapped``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .layers import LAYERS, NUM_LAYERS

RAMPS = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out")
WEAKENED = {"weak input": ("input",), "weak middle": ("middle",), "weak output": ("output",),
            "strong middle": ("input", "output")}
COMPOSITION_LAYERS = (4, 5)  # the deepest input layers (1280 wide) carry the layout
STYLE_LAYERS = (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)
LAYER_SETS = ("style transfer", "composition", "strong style transfer", "style and composition",
              "style transfer precise", "composition precise")
WEIGHT_TYPES = RAMPS + tuple(WEAKENED) + LAYER_SETS


@dataclass(frozen=True)
class LayerWeights:
    scales: tuple[float, ...]  # λ per layer, 0 where the type leaves a layer out
    swapped: frozenset[int] = frozenset()  # layers whose image tokens go to the unconditional rows


def block_of(layer: int) -> str:
    """ComfyUI's block type of a layer: input, middle or output."""
    block = LAYERS[layer].block
    return "middle" if block == "mid" else "input" if block.startswith("down") else "output"


def ramp(name: str, weight: float, layer: int) -> float:
    position = layer / NUM_LAYERS
    middle = abs(layer - NUM_LAYERS / 2) / (NUM_LAYERS / 2)
    factor = {"linear": 1.0, "ease in": 0.05 + 0.95 * (1 - position), "ease out": 0.05 + 0.95 * position,
              "ease in-out": 0.05 + 0.95 * (1 - middle), "reverse in-out": 0.05 + 0.95 * middle}[name]
    return weight * factor


def layer_set(name: str, weight: float, composition: float | None) -> dict[int, float]:
    """λ of the layers a layer-set type keeps. ``composition``: the second weight of the types
    that have one: ``weight_composition`` for style and composition (default 1.0, as ComfyUI),
    ``style_boost`` for style transfer precise and ``composition_boost`` for composition precise
    (default: the weight)."""
    if composition is None:
        composition = 1.0 if name == "style and composition" else weight
    style = {layer: weight for layer in STYLE_LAYERS}
    if name == "style transfer":
        return style
    if name == "composition":
        return {4: weight * 0.25, 5: weight}
    if name == "strong style transfer":
        return {layer: weight for layer in range(NUM_LAYERS) if layer not in COMPOSITION_LAYERS}
    if name in ("style and composition", "style transfer precise"):
        return {**style, 4: composition * 0.25, 5: composition}
    # composition precise: the boost weighs the style layers, the weight the composition layers
    return {**{layer: composition for layer in STYLE_LAYERS}, 4: weight * 0.25, 5: weight,
            **{layer: composition * 0.1 for layer in (6, 7, 8)}}


def weight_type(name: str, weight: float = 1.0, composition: float | None = None) -> LayerWeights:
    """The 16 λ (and swapped layers) of ComfyUI's weight type ``name`` at ``weight``."""
    if name not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {name!r} for SD1.5; expected one of: {', '.join(WEIGHT_TYPES)}")
    if name in RAMPS:
        return LayerWeights(tuple(ramp(name, weight, layer) for layer in range(NUM_LAYERS)))
    if name in WEAKENED:
        return LayerWeights(tuple(weight * 0.2 if block_of(layer) in WEAKENED[name] else weight
                                  for layer in range(NUM_LAYERS)))
    kept = layer_set(name, weight, composition)
    scales = tuple(kept.get(layer, 0.0) for layer in range(NUM_LAYERS))
    swapped = {"style transfer precise": set(COMPOSITION_LAYERS),
               "composition precise": set(range(NUM_LAYERS)) - set(COMPOSITION_LAYERS)}.get(name, set())
    return LayerWeights(scales, frozenset(layer for layer in swapped if layer in kept))
