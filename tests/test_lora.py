"""LoRAs (issue 13): kohya-ss / A1111 files (with LoCon's convolutions) and diffusers' layouts, merged
into our UNet and text encoder at load time, against diffusers' ``load_lora_weights`` +
``fuse_lora(lora_scale=w)`` on the same files; refusals; the command line.

The models are ``small``'s (SD1.5's structure at a tenth of the width: every block, resnet,
sampler and attention layer a full-size LoRA names, so the key names are the full-size ones).
Tolerance: 1e-4 max abs on the UNet's and the text encoder's outputs (fp32; both sides add the
same float32 product to the same weights, so the differences are rounding in the forward pass).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import a1111
import reference_models as ref
from ipadapter_min.cli import sample
from ipadapter_min.formats.files import CheckpointError
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.pipelines.text_to_image import StableDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
RANK, ALPHA = 4, 6.0  # kohya-ss: one network_alpha for the linear layers …
CONV_RANK, CONV_ALPHA = 2, 1.0  # … and one conv_alpha for LoCon's 3×3 convolutions


def kohya_layers(unet, text_encoder) -> dict[str, torch.nn.Module]:
    """kohya-ss's LoRA names (networks/lora.py with conv_dim, i.e. LoCon): every Linear and Conv2d in
    the UNet's Transformer2DModel, ResnetBlock2D, Downsample2D and Upsample2D modules and in the text
    encoder's CLIPAttention and CLIPMLP, named ``lora_unet_`` / ``lora_te_`` + the diffusers module
    path with "." written "_". (transformers 5's CLIPTextModel has no ``text_model`` level any more;
    kohya's names, from older transformers, have it.)"""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPMLP
    layers = {}
    for prefix, model, kinds, path in (("lora_unet", unet, (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D), ""),
                                       ("lora_te", text_encoder, (CLIPAttention, CLIPMLP), "text_model.")):
        for name, module in model.named_modules():
            if isinstance(module, kinds):
                for child_name, child in module.named_modules():
                    if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                        layers[f"{prefix}_{path}{name}.{child_name}".replace(".", "_")] = child
    return layers


def write_kohya(small, path, seed: int = 0):
    """Random down and up factors (both nonzero), stored in fp16 as kohya-ss saves them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in kohya_layers(small.unet, small.text_encoder).items():
        conv3 = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
        rank = CONV_RANK if conv3 else RANK
        inputs, outputs = layer.weight.shape[1], layer.weight.shape[0]
        down_shape = (rank, *layer.weight.shape[1:])
        up_shape = (outputs, rank, 1, 1) if layer.weight.dim() == 4 else (outputs, rank)
        fan_in = inputs * layer.weight[0, 0].numel()
        state[f"{name}.lora_down.weight"] = ((torch.rand(down_shape, generator=g) * 2 - 1) / fan_in ** 0.5).half()
        state[f"{name}.lora_up.weight"] = ((torch.rand(up_shape, generator=g) * 2 - 1) / rank ** 0.5).half()
        state[f"{name}.alpha"] = torch.tensor(CONV_ALPHA if conv3 else ALPHA)
    save_file(state, str(path))
    return path


PEFT_UNET = dict(r=4, lora_alpha=6, rank_pattern={"^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2},
                 alpha_pattern={"proj_out": 3.0}, target_modules=[
                     "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"])
PEFT_TEXT = dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])


def write_peft(small, folder):
    """diffusers' own layout, written by diffusers: peft adapters with random A and B
    (init_lora_weights=False), per-layer ranks and alphas, rsLoRA in the text encoder."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet, text_encoder = copy.deepcopy(small.unet), copy.deepcopy(small.text_encoder)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(init_lora_weights=False, **PEFT_UNET))
    text_encoder.add_adapter(LoraConfig(init_lora_weights=False, **PEFT_TEXT))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def write_old_diffusers(peft_file, path):
    """diffusers' layout before peft (LoRACompatibleLinear / the text encoder's lora_linear_layer):
    the same factors under the old suffixes, no alphas (a scale of 1)."""
    state = load_file(str(peft_file))
    old = {}
    for key, value in state.items():
        factor = "down" if ".lora_A." in key else "up"
        stem = key.rsplit(".lora_", 1)[0]
        old[f"{stem}.{'lora' if key.startswith('unet.') else 'lora_linear_layer'}.{factor}.weight"] = value
    save_file(old, str(path))
    return path


@pytest.fixture(scope="module")
def files(small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    peft = write_peft(small, folder / "peft")
    return {"kohya": write_kohya(small, folder / "kohya.safetensors"),
            "kohya_b": write_kohya(small, folder / "kohya_b.safetensors", seed=1),
            "peft": peft, "old": write_old_diffusers(peft, folder / "old.safetensors"), "folder": folder}


def inputs(small):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    ids = small.tokenizer(["a photo of a cat", ""], padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
    return x, torch.tensor([1, 700]), context, ids


@torch.no_grad()
def reference_outputs(small, loras):
    """diffusers: each LoRA loaded and fused with its weight, in turn, into copies of the models."""
    unet, text_encoder = copy.deepcopy(small.unet), copy.deepcopy(small.text_encoder)
    pipe = ref.diffusers_pipeline(unet, small.vae, text_encoder, small.tokenizer)
    for path, weight in loras:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=weight)
        pipe.unload_lora_weights()  # the fused weights stay
    x, t, context, ids = inputs(small)
    return unet(x, t, encoder_hidden_states=context).sample, text_encoder(ids).last_hidden_state


@torch.no_grad()
def our_outputs(models, small):
    x, t, context, ids = inputs(small)
    return models["unet"](x, t, context), models["text_encoder"](ids)


@pytest.fixture(scope="module")
def base_outputs(small):
    return our_outputs(load_sd15(small.folder), small)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("layout,weight", [("kohya", 0.7), ("peft", 1.3), ("old", 0.6)])
def test_merged_lora_matches_diffusers(small, files, base_outputs, layout, weight):
    loras = [(files[layout], weight)]
    expected_unet, expected_text = reference_outputs(small, loras)
    unet_out, text_out = our_outputs(load_sd15(small.folder, loras=loras), small)
    unet_diff, text_diff = max_diff(unet_out, expected_unet), max_diff(text_out, expected_text)
    unet_change, text_change = max_diff(unet_out, base_outputs[0]), max_diff(text_out, base_outputs[1])
    print(f"{layout} LoRA at {weight}: UNet {unet_diff:.1e} from diffusers (the LoRA changes it by {unet_change:.2f}), "
          f"text encoder {text_diff:.1e} (changed by {text_change:.2f})")
    assert unet_diff <= TOL and text_diff <= TOL
    assert unet_change > 1000 * TOL and text_change > 1000 * TOL


def test_two_loras_add_up(small, files, base_outputs):
    loras = [(files["kohya"], 0.7), (files["peft"], 0.5)]
    expected_unet, expected_text = reference_outputs(small, loras)
    ours = load_sd15(small.folder, loras=loras)
    unet_out, text_out = our_outputs(ours, small)
    print(f"two LoRAs: UNet {max_diff(unet_out, expected_unet):.1e} from diffusers, text encoder "
          f"{max_diff(text_out, expected_text):.1e}")
    assert max_diff(unet_out, expected_unet) <= TOL and max_diff(text_out, expected_text) <= TOL
    first = load_sd15(small.folder, loras=loras[:1])
    assert max_diff(our_outputs(first, small)[0], unet_out) > 1000 * TOL  # the second one acts


def test_lora_folder_as_diffusers_writes_it(small, files):
    """The folder save_lora_weights writes reads as its file."""
    by_folder = load_sd15(small.folder, loras=[(files["peft"].parent, 1.0)])
    by_file = load_sd15(small.folder, loras=[(files["peft"], 1.0)])
    assert all(torch.equal(a, b) for a, b in zip(by_folder["unet"].parameters(), by_file["unet"].parameters()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_merge_in_float32(small, files, dtype):
    """Each merged weight is the model's weight plus the float32 update, rounded once to the dtype."""
    weight = 0.7
    merged = load_sd15(small.folder, dtype=dtype, loras=[(files["kohya"], weight)])
    base = load_sd15(small.folder, dtype=dtype)
    state = load_file(str(files["kohya"]))
    checked = 0
    for name in ("down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "up_blocks_1_resnets_0_conv1",
                 "mid_block_attentions_0_proj_in"):
        down, up = state[f"lora_unet_{name}.lora_down.weight"].float(), state[f"lora_unet_{name}.lora_up.weight"].float()
        scale = weight * (state[f"lora_unet_{name}.alpha"].item() / down.shape[0])
        ours_name = {"down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
                     "up_blocks_1_resnets_0_conv1": "output_blocks.3.0.in_layers.2",
                     "mid_block_attentions_0_proj_in": "middle_block.1.proj_in"}[name] + ".weight"
        w = base["unet"].get_parameter(ours_name)
        expected = (w.float() + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * scale).to(dtype)
        assert torch.equal(merged["unet"].get_parameter(ours_name), expected), name
        assert not torch.equal(expected, w)
        checked += 1
    assert checked == 3


def original_names(small) -> dict[str, str]:
    """diffusers UNet module path → the original (ldm) one, from diffusers' own single-file converter
    (convert_ldm_unet_checkpoint) run on tensors tagged with the original key they came from."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    ours = load_sd15(small.folder)["unet"].state_dict()
    tagged = {f"model.diffusion_model.{key}": torch.zeros(1) for key in ours}
    origin = {id(v): k.removeprefix("model.diffusion_model.") for k, v in tagged.items()}
    converted = convert_ldm_unet_checkpoint(tagged, dict(small.unet.config))
    return {k.removesuffix(".weight"): origin[id(v)].removesuffix(".weight") for k, v in converted.items()
            if k.endswith(".weight")}


def test_kohya_names_of_the_original_unet_read_the_same(small, files, tmp_path):
    """A1111 and ComfyUI also read SD1.5 LoRAs that name the UNet's layers by the original
    checkpoint's names (lora_unet_input_blocks_1_1_proj_in): the same file renamed so merges the same."""
    names = {k.replace(".", "_"): v.replace(".", "_") for k, v in original_names(small).items()}
    state, renamed = load_file(str(files["kohya"])), {}
    for key, value in state.items():
        stem, _, suffix = key.partition(".")
        if stem.startswith("lora_unet_"):
            stem = "lora_unet_" + names[stem.removeprefix("lora_unet_")]
        renamed[f"{stem}.{suffix}"] = value
    assert sum(k.startswith("lora_unet_input_blocks_") for k in renamed) > 50
    save_file(renamed, str(tmp_path / "original_names.safetensors"))
    a = load_sd15(small.folder, loras=[(files["kohya"], 0.8)])
    b = load_sd15(small.folder, loras=[(tmp_path / "original_names.safetensors", 0.8)])
    for part in ("unet", "text_encoder"):
        assert all(torch.equal(x, y) for x, y in zip(a[part].state_dict().values(), b[part].state_dict().values()))


def edited(files, tmp_path, edit, name="edited.safetensors"):
    state = load_file(str(files["kohya"]))
    edit(state)
    save_file(state, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update({"lora_unet_down_blocks_0_attentions_0_foo.lora_down.weight": torch.zeros(4, 32),
                         "lora_unet_down_blocks_0_attentions_0_foo.lora_up.weight": torch.zeros(32, 4)}),
     "2 keys match no layer of SD1.5's UNet or text encoder (a LoRA for another model, or of a kind other than LoRA?): "
     "'lora_unet_down_blocks_0_attentions_0_foo.lora_down.weight', 'lora_unet_down_blocks_0_attentions_0_foo.lora_up.weight'"),
    (lambda s: s.update({"lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.zeros(4, 4)}),
     "1 keys match no layer"),
    (lambda s: s.pop("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"),
     "key 'lora_unet_mid_block_attentions_0_proj_in.lora_down.weight' has no up factor beside it"),
    (lambda s: s.update({"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(128, 5, 1, 1)}),
     "has shape [128, 5, 1, 1], expected [128, 4, 1, 1] for unet.middle_block.1.proj_in.weight"),
    (lambda s: s.update({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(2, 32, 1, 1)}),
     "does not fit the kernel of unet.input_blocks.1.0.in_layers.2.weight"),
    (lambda s: s.update({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)}),
     "this looks like a LoRA for SDXL (key 'lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight')"),
    (lambda s: s.update({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 64)}),
     "this looks like a LoRA for SDXL"),
    (lambda s: s.update({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                         torch.zeros(4, 2048)}),
     "takes 768 inputs (SDXL's cross-attention context): a LoRA for another base model?"),
])
def test_bad_loras_are_refused_in_one_line(small, files, tmp_path, edit, message):
    path = edited(files, tmp_path, edit)
    with pytest.raises(ValueError) as info:  # CheckpointError is a ValueError
        load_sd15(small.folder, loras=[(path, 1.0)])
    text = str(info.value)
    assert isinstance(info.value, CheckpointError) and message in text and str(path) in text and "\n" not in text


def test_diffusers_sdxl_keys_and_bad_weights_are_refused(small, files, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"unet.add_embedding.linear_1.lora_A.weight": torch.zeros(4, 2816),
               "unet.add_embedding.linear_1.lora_B.weight": torch.zeros(1280, 4)}, str(path))
    with pytest.raises(CheckpointError, match="looks like a LoRA for SDXL"):
        load_sd15(small.folder, loras=[(path, 1.0)])
    with pytest.raises(ValueError, match="the LoRA weight must be a finite number"):
        load_sd15(small.folder, loras=[(files["kohya"], float("nan"))])


# ----------------------------------------------------------------------------- command line

def cli(small, out, *extra):
    args = ["--model", str(small.folder), "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64",
            "--seed", "3", "--device", "cpu", "--no-progress", "--out", str(out), *extra]
    assert sample.main(args) == 0
    image = Image.open(out)
    return np.asarray(image.convert("RGB")).astype(int), a1111.parse(image.text["parameters"])


def test_cli_loras_text_to_image(small, files, tmp_path):
    plain, _ = cli(small, tmp_path / "plain.png")
    with_loras, parameters = cli(small, tmp_path / "lora.png", "--lora", f"{files['kohya']}:0.7", "--lora",
                                 str(files["peft"]))
    assert parameters["LoRA"] == "kohya:0.7 pytorch_lora_weights:1"
    sd = StableDiffusion.from_file(small.folder, loras=[(files["kohya"], 0.7), (files["peft"], 1.0)])
    api = np.asarray(sd("a cat", steps=2, width=64, height=64, seed=3, progress=False)[0]).astype(int)
    print(f"--lora changes the image by up to {np.abs(with_loras - plain).max()}/255")
    assert np.array_equal(with_loras, api) and np.abs(with_loras - plain).max() > 10


def test_cli_loras_with_an_image_prompt(small, small_vit_h_folder, files, tmp_path):
    adapter = tmp_path / "ip-adapter.bin"  # official keys at small's cross-attention widths (SD1.5's / 10)
    ref.write_official(ref.official_state("base", widths={n: w // 10 for n, w in ref.OFFICIAL_WIDTHS.items()}), adapter)
    ref.sample_images()[0].save(tmp_path / "ref.png")
    prompt = ["--ip-adapter", str(adapter), "--image-encoder", str(small_vit_h_folder), "--image", str(tmp_path / "ref.png")]
    plain, _ = cli(small, tmp_path / "plain.png", *prompt)
    with_lora, parameters = cli(small, tmp_path / "lora.png", *prompt, "--lora", f"{files['kohya']}:0.5")
    assert parameters["LoRA"] == "kohya:0.5" and parameters["IP-Adapter"] == "ip-adapter"
    assert np.abs(with_lora - plain).max() > 10


@pytest.mark.parametrize("value,message", [
    ("{kohya}:strong", "--lora {kohya}:strong: the weight after ':' must be a number"),
    ("{kohya}:nan", "--lora {kohya}:nan: the weight after ':' must be a finite number"),
    ("{folder}/missing.safetensors:0.5", "--lora {folder}/missing.safetensors: no such file"),
])
def test_cli_bad_lora_flags_are_one_line(small, files, tmp_path, capsys, value, message):
    names = {k: str(v) for k, v in files.items()}
    code = sample.main(["--model", str(small.folder), "--out", str(tmp_path / "o.png"), "--lora", value.format(**names)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {message.format(**names)}\n" and not (tmp_path / "o.png").exists()
