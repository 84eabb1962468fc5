"""One IP-Adapter training step (the official tutorial_train.py recipe) at the full SD1.5 size
against diffusers: loss, every trainable gradient and the weights after one AdamW step. As
test_training.py (whose batch, reference step and parameter pairing this reuses), but on the full
860 M UNet with random weights, at latents 8×8 (64 px) and batch 3, fp32, CPU.

Memory: the two UNets (3.4 GB each in fp32) and nothing else: diffusers' is read first (its load
briefly holds the weights twice), ours second (memory-mapped from the same folder).
"""
import gc

import pytest

from ipadapter_min.formats.ip_adapter import detect_variant
from ipadapter_min.ip_adapter.adapter import IPAdapter
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.training.recipe import init_ip_layers_from_unet
from reference_models import projection_shapes, randomize_
from test_training import add_reference_processors, check_step_against_diffusers, loss_change_when_features_swap

pytestmark = pytest.mark.usefixtures("free_memory")


@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`")
def test_full_size_training_step_matches_diffusers(full):
    from diffusers import UNet2DConditionModel
    theirs = full.load_unet().requires_grad_(False)
    add_reference_processors(theirs)
    unet = load_sd15(full.folder)["unet"]  # the VAE and text encoder are dropped at once
    gc.collect()
    adapter = randomize_(IPAdapter(detect_variant(projection_shapes("base"))), 1)  # SD1.5 widths
    init_ip_layers_from_unet(adapter, unet)
    projection = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        theirs, adapter.image_proj.state_dict(), low_cpu_mem_usage=False)
    # The image features matter: swapping two samples' features changes the loss by far more than
    # op-order noise (10× the loss bound); a no-op adapter gives the same loss.
    assert loss_change_when_features_swap(unet, adapter) > 1e-4
    check_step_against_diffusers(unet, adapter, theirs, projection)
