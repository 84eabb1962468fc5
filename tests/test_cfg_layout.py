"""The classifier-free-guidance batch layout: one owner (``cfg``) for the text rows and the
IP-Adapter hook's image rows, and a hook that takes any layout a runtime batches in (ComfyUI:
conditional and unconditional rows in separate UNet calls, in either order, or interleaved).

Small random SD1.5-structured UNet (16 cross-attention layers), fp32, CPU."""
from __future__ import annotations

import functools

import pytest
import torch

from ipadapter_min.samplers.cfg import CFGBatch, per_row
from ipadapter_min.models.configs import UNetConfig
from ipadapter_min.ip_adapter.adapter import IPAdapterLayers
from ipadapter_min.ip_adapter.hook_options import ImagePromptAttention
from ipadapter_min.pipelines.text_to_image import StableDiffusion
from ipadapter_min.samplers import DDIM
from ipadapter_min.models.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)

TEXT_WIDTH = 32
# A UNet run per layout vs the same rows of the batched run: measured max abs difference 0 (same
# batch size) to 1e-6 (another batch size: the convolutions block differently); eps has std 0.3.
ATOL = 1e-5


@functools.lru_cache(maxsize=1)
def models() -> tuple[UNet, IPAdapterLayers]:
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=16, groups=8, heads=2, context_dim=TEXT_WIDTH)).eval()
    layers = IPAdapterLayers(widths=[layer.to_q.out_features for layer in unet.cross_attention_layers()]).eval()
    return unet, layers


def inputs():
    """Two samples' latents, the prompt's and the negative prompt's text, positive and negative image tokens."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 1, 5, TEXT_WIDTH, generator=g)
    positive, negative = torch.randn(2, 1, 4, 768, generator=g)
    return latents, cond, uncond, positive, negative


def run(rows, samples, hook, told=None):
    """The UNet on the given rows: row i is sample ``samples[i]``, conditional where ``rows[i]``,
    laid out by ``per_row``; the hook is told ``rows`` as a runtime would (or ``told``)."""
    unet, _ = models()
    latents, cond, uncond, _, _ = inputs()
    hook.rows = rows if told is None else told
    with torch.no_grad():
        return unet(latents[list(samples)], torch.tensor(600), per_row(rows, cond, uncond), hook)


def make_hook():
    _, layers = models()
    *_, positive, negative = inputs()
    return ImagePromptAttention(layers, positive, negative, 1.0)


def test_cfg_batch_inputs_text_and_guidance_agree_on_the_order():
    """CFGBatch's latents, per-row items and eps split follow one order: with a stand-in UNet
    (latents × text), guidance 0 gives each sample's unconditional prediction and 1 its
    conditional one; a batch without guidance has conditional rows only."""
    latents, cond, uncond = torch.randn(2, 3), torch.randn(1, 3), torch.randn(1, 3)
    batch = CFGBatch(2, guided=True)
    assert batch.rows == (False, False, True, True)
    eps = batch.inputs(latents) * batch.per_row(cond, uncond)
    assert torch.equal(batch.guide(eps, 0.0), latents * uncond)
    assert torch.allclose(batch.guide(eps, 1.0), latents * cond, atol=1e-6)
    assert not torch.allclose(latents * cond, latents * uncond)  # the two kinds are told apart

    plain = CFGBatch(2, guided=False)
    assert plain.rows == (True, True)
    assert torch.equal(plain.guide(plain.inputs(latents) * plain.per_row(cond), 7.5), latents * cond)


# (row kinds, sample of each row): how a runtime may split or order the pipeline's batch
LAYOUTS = {
    "cond-only": ((True, True), (0, 1)),
    "uncond-only": ((False, False), (0, 1)),
    "one-row": ((True,), (1,)),
    "reversed": ((True, True, False, False), (0, 1, 0, 1)),
    "interleaved": ((False, True, False, True), (0, 0, 1, 1)),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_any_layout_gives_the_batched_rows(layout):
    """The pipeline's batch (diffusers' order, 2 samples) in one UNet call vs the same rows in
    another layout, as ComfyUI would call the UNet: every row's eps agrees to ATOL."""
    pipeline = CFGBatch(2, guided=True)
    hook = make_hook()
    batched = run(pipeline.rows, (0, 1, 0, 1), hook)
    rows, samples = LAYOUTS[layout]
    got = run(rows, samples, hook)
    want = batched[[2 * row + sample for row, sample in zip(rows, samples)]]  # row position in the pipeline's batch
    err = (got - want).abs().max().item()
    print(f"{layout}: max abs difference {err:.1e} (eps std {want.std():.2f})")
    assert err <= ATOL


def test_a_wrong_layout_changes_the_output():
    """The control: telling the hook the opposite kinds for the same rows (the negative image tokens
    in the conditional rows and vice versa) changes every row, so the layout is really used."""
    hook = make_hook()
    rows, samples = (False, True, True), (0, 1, 0)
    right = run(rows, samples, hook)
    wrong = run(rows, samples, hook, told=tuple(not r for r in rows))
    change = (wrong - right).flatten(1).abs().amax(1)
    print(f"wrong layout: max change per row {change.tolist()}")
    assert (change > 100 * ATOL).all()


def test_denoise_tells_the_hook_its_layout():
    """StableDiffusion.denoise sets the hook's rows: without guidance no row is unconditional, so
    NaN negative tokens are never read (same bits as finite ones); with guidance they are."""
    unet, layers = models()
    sd = StableDiffusion(unet, None, None)
    latents, cond, uncond, positive, negative = inputs()
    nan = torch.full_like(negative, float("nan"))
    hook = ImagePromptAttention(layers, positive, nan, 1.0, rows=(False,))  # a stale layout: replaced
    finite = sd.denoise(latents, cond, uncond, DDIM(2), 1.0, ImagePromptAttention(layers, positive, negative),
                        progress=False)
    assert torch.isfinite(finite).all()
    assert torch.equal(sd.denoise(latents, cond, uncond, DDIM(2), 1.0, hook, progress=False), finite)
    assert hook.rows == (True, True)
    assert torch.isnan(sd.denoise(latents, cond, uncond, DDIM(2), 7.5, hook, progress=False)).all()
    assert hook.rows == (False, False, True, True)


def one_line_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_layout_errors_are_one_line_and_name_the_sizes():
    unet, layers = models()
    latents, cond, uncond, positive, negative = inputs()
    hook = make_hook()

    def unet_call(batch):
        with torch.no_grad():
            unet(latents[:1].expand(batch, -1, -1, -1), torch.tensor(600), cond.expand(batch, -1, -1), hook)

    hook.rows = (True, False, True)  # set for 3 rows, called with 4: fails at the first layer
    one_line_error(lambda: unet_call(4), r"hook.rows has 3 rows but cross-attention layer 0 has batch 4")
    hook.rows = None  # diffusers' layout needs an even batch
    one_line_error(lambda: unet_call(3), r"layer 0 has batch 3, which cannot be diffusers' unconditional half")

    def set_rows(rows):
        hook.rows = rows
    one_line_error(lambda: set_rows([1, 0]), r"one bool per UNet batch row .* got \[1, 0\]")
    one_line_error(lambda: set_rows([]), "one bool per UNet batch row")

    one_line_error(lambda: per_row((True, False), cond), "the layout has 1 unconditional rows but no unconditional")
    one_line_error(lambda: per_row((True,), cond, uncond[:, :3]), r"\[1, 5, 32\] and \[1, 3, 32\]")
    one_line_error(lambda: per_row((True,), cond.expand(2, -1, -1), None), r"leading size 1\), got \[2, 5, 32\]")
    one_line_error(lambda: ImagePromptAttention(layers, positive.expand(2, -1, -1), negative),
                   r"positive image tokens must be \(1, tokens, 768\), got \[2, 4, 768\]")
    one_line_error(lambda: ImagePromptAttention(layers, positive, negative[:, :3]),
                   r"positive image tokens have shape \[1, 4, 768\] but negative ones \[1, 3, 768\]")
