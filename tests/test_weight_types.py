"""Our weight-type table against ComfyUI_IPAdapter_plus's formulas, written out below as its
``ipadapter_execute`` (the layer-set dicts) and ``ipadapter_attention`` (the ramps, the weakened
blocks and the precise types' cond/uncond swap) compute them for SD1.5 (16 layers; the
transformer index is the run order, input 0–5, middle 6, output 7–15). Source:
cubiq/ComfyUI_IPAdapter_plus IPAdapterPlus.py / CrossAttentionPatch.py, as quoted in
shared/notes/reference-facts-wave2.md §6.1–6.2."""
import pytest

from ipadapter_min.ip_adapter.weight_types import WEIGHT_TYPES, weight_type

LAYERS = 16
BLOCK = ["input"] * 6 + ["middle"] + ["output"] * 9


def comfyui_dict(weight_type_name, weight, weight_composition=1.0, style_boost=None, composition_boost=None):
    """ipadapter_execute's dicts (SD1.5 branch); None when the type is not a dict type."""
    w = weight
    if weight_type_name == "style transfer":
        return {0: w, 1: w, 2: w, 3: w, 9: w, 10: w, 11: w, 12: w, 13: w, 14: w, 15: w}
    if weight_type_name == "composition":
        return {4: w * 0.25, 5: w}
    if weight_type_name == "strong style transfer":
        return {0: w, 1: w, 2: w, 3: w, 6: w, 7: w, 8: w, 9: w, 10: w, 11: w, 12: w, 13: w, 14: w, 15: w}
    if weight_type_name == "style and composition":
        wc = weight_composition
        return {0: w, 1: w, 2: w, 3: w, 4: wc * 0.25, 5: wc, 9: w, 10: w, 11: w, 12: w, 13: w, 14: w, 15: w}
    if weight_type_name == "style transfer precise":
        wc = style_boost if style_boost is not None else w
        return {0: w, 1: w, 2: w, 3: w, 4: wc * 0.25, 5: wc, 9: w, 10: w, 11: w, 12: w, 13: w, 14: w, 15: w}
    if weight_type_name == "composition precise":
        wc = w
        w = composition_boost if composition_boost is not None else w
        return {0: w, 1: w, 2: w, 3: w, 4: wc * 0.25, 5: wc, 6: w * .1, 7: w * .1, 8: w * .1, 9: w, 10: w, 11: w,
                12: w, 13: w, 14: w, 15: w}
    return None


def comfyui_layer(weight_type_name, weight, t_idx, **dict_args):
    """ipadapter_attention's per-layer weight and whether cond and uncond are swapped; weight
    None where the layer gets no image (the callback returns 0)."""
    block_type = BLOCK[t_idx]
    table = comfyui_dict(weight_type_name, weight, **dict_args)
    swapped = False
    if weight_type_name == "ease in":
        weight = weight * (0.05 + 0.95 * (1 - t_idx / LAYERS))
    elif weight_type_name == "ease out":
        weight = weight * (0.05 + 0.95 * (t_idx / LAYERS))
    elif weight_type_name == "ease in-out":
        weight = weight * (0.05 + 0.95 * (1 - abs(t_idx - (LAYERS / 2)) / (LAYERS / 2)))
    elif weight_type_name == "reverse in-out":
        weight = weight * (0.05 + 0.95 * (abs(t_idx - (LAYERS / 2)) / (LAYERS / 2)))
    elif weight_type_name == "weak input" and block_type == "input":
        weight = weight * 0.2
    elif weight_type_name == "weak middle" and block_type == "middle":
        weight = weight * 0.2
    elif weight_type_name == "weak output" and block_type == "output":
        weight = weight * 0.2
    elif weight_type_name == "strong middle" and (block_type == "input" or block_type == "output"):
        weight = weight * 0.2
    elif table is not None:
        if t_idx not in table:
            return None, False
        if weight_type_name == "style transfer precise":
            swapped = t_idx in (4, 5)
        elif weight_type_name == "composition precise":
            swapped = t_idx not in (4, 5)
        weight = table[t_idx]
    return weight, swapped


@pytest.mark.parametrize("name", WEIGHT_TYPES)
@pytest.mark.parametrize("weight", [1.0, 0.65])
def test_weight_types_match_comfyui(name, weight):
    ours = weight_type(name, weight)
    for t_idx in range(LAYERS):
        expected, swapped = comfyui_layer(name, weight, t_idx)
        assert ours.scales[t_idx] == pytest.approx(expected or 0.0, abs=1e-12), (name, t_idx)
        assert (t_idx in ours.swapped) == swapped, (name, t_idx)


@pytest.mark.parametrize("name,kwarg", [("style and composition", "weight_composition"),
                                        ("style transfer precise", "style_boost"),
                                        ("composition precise", "composition_boost")])
def test_composition_weights_match_comfyui(name, kwarg):
    ours = weight_type(name, 0.8, composition=0.3)
    for t_idx in range(LAYERS):
        expected, _ = comfyui_layer(name, 0.8, t_idx, **{kwarg: 0.3})
        assert ours.scales[t_idx] == pytest.approx(expected or 0.0, abs=1e-12), (name, t_idx)
    assert len({round(s, 6) for s in ours.scales}) > 2  # the two weights both show


def test_types_differ_and_unknown_types_are_refused():
    tables = {name: (weight_type(name).scales, weight_type(name).swapped) for name in WEIGHT_TYPES}
    assert len(set(tables.values())) == len(WEIGHT_TYPES)  # no two presets are the same
    with pytest.raises(ValueError, match="unknown weight type 'style' for SD1.5"):
        weight_type("style")
