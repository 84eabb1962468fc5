"""Long prompts (``long_prompts``): diffusers' truncation, now with a warning naming the dropped
words, and AUTOMATIC1111's chunks of 75 tokens (``long_prompt="chunk"``), checked against
transformers' tokenizer and text encoder on chunk rows built by hand. Tiny models, fp32, CPU."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ipadapter_min.models.configs import UNetConfig
from ipadapter_min.ip_adapter.adapter import IPAdapterLayers
from ipadapter_min.ip_adapter.hook_options import ImagePromptAttention
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.pipelines.long_prompts import LONG_PROMPT_MODES, chunk_ids
from ipadapter_min.pipelines.text_to_image import StableDiffusion
from ipadapter_min.models.tokenizer import BOS_ID, EOS_ID, Tokenizer
from ipadapter_min.models.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)

TOL = 1e-5
WORDS = "red green blue cat dog tree house river hill sun moon star road car boat bird fish rock sand snow".split()


def words(n: int, start: int = 0) -> list[str]:
    """n words of one token each."""
    return [WORDS[(start + i) % len(WORDS)] for i in range(n)]


LONG = " ".join(words(100))  # 100 tokens: 75 kept by truncation, 25 dropped


@pytest.fixture(scope="module")
def sd(tiny) -> StableDiffusion:
    models = load_sd15(tiny.folder)
    return StableDiffusion(models["unet"], models["vae"], models["text_encoder"])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def row(ids: list[int]) -> list[int]:
    """A chunk as A1111 lays it out: BOS, the tokens, EOS, EOS padding to 77."""
    return [BOS_ID, *ids, EOS_ID] + [EOS_ID] * (75 - len(ids))


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ipadapter_min" and r.levelno == logging.WARNING]


def test_modes():
    assert LONG_PROMPT_MODES == ("truncate", "chunk")


def test_decode_round_trips_and_matches_transformers(tiny, tok):
    for text in ["a photo of a cat sitting on a red sofa in the sun", "café naïve 日本 über", LONG]:
        assert tok.decode(tok.encode(text)) == text
    ids = tiny.tokenizer("A Photo, of 2 cats' toys!! <|endoftext|>x ü日本", truncation=False).input_ids
    assert tok.decode(ids) == tiny.tokenizer.decode(ids)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # any ids, UTF-8 cut mid-character and special tokens included
        ids = torch.randint(0, 49408, (int(torch.randint(1, 20, (), generator=gen)),), generator=gen).tolist()
        assert tok.decode(ids) == tiny.tokenizer.decode(ids)


def test_truncate_is_todays_path_and_names_the_dropped_words(tiny, sd, tok, caplog):
    assert len(tok.encode(LONG)) == 100
    with caplog.at_level(logging.WARNING, logger="ipadapter_min"):
        short = sd.encode_prompt("a photo of a cat")
        assert warnings(caplog) == []
        got = sd.encode_prompt(LONG)
    reference_ids = tiny.tokenizer(LONG, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
    assert torch.equal(tok([LONG]), reference_ids)
    assert torch.equal(got, sd.text_encoder(reference_ids))  # the old path, bit for bit
    assert (got - tiny.text_encoder(reference_ids).last_hidden_state).abs().max() <= TOL
    assert short.shape == got.shape == (1, 77, 32)
    dropped = tiny.tokenizer.decode(tiny.tokenizer(LONG, truncation=False).input_ids[76:-1])
    assert dropped == " ".join(words(25, start=75))
    assert warnings(caplog) == [f'the prompt is 100 tokens, more than CLIP\'s 75: dropped "{dropped}" '
                                f'(--long-prompt chunk keeps them)']


def test_truncate_warns_for_the_negative_prompt_too(sd, caplog):
    with caplog.at_level(logging.WARNING, logger="ipadapter_min"):
        sd(LONG, negative_prompt=" ".join(words(80)), steps=1, width=32, height=32, progress=False)
    prompt, negative = warnings(caplog)
    assert prompt.startswith("the prompt is 100 tokens")
    dropped = " ".join(words(5, start=75))
    assert negative.startswith(f'the negative prompt is 80 tokens, more than CLIP\'s 75: dropped "{dropped}"')


def test_chunk_keeps_a_short_prompt_as_it_is(sd):
    for text in ["", "a photo of a cat", " ".join(words(75))]:
        assert torch.equal(sd.encode_prompt(text, long_prompt="chunk"), sd.encode_prompt(text))
    assert torch.equal(sd.encode_prompt("a cat", 1, "chunk"), sd.encode_prompt("a cat", 1))


def test_chunk_encodes_each_chunk_as_transformers_does(tiny, sd, tok, caplog):
    ids = tok.encode(LONG)
    with caplog.at_level(logging.WARNING, logger="ipadapter_min"):
        got = sd.encode_prompt(LONG, long_prompt="chunk")
    assert warnings(caplog) == []  # nothing is dropped
    assert got.shape == (1, 154, 32)
    expected = tiny.text_encoder(torch.tensor([row(ids[:75]), row(ids[75:])])).last_hidden_state
    diff = (got[0].reshape(2, 77, 32) - expected).abs().max().item()
    print(f"chunks vs transformers: max abs difference {diff:.1e}")
    assert diff <= TOL


@pytest.mark.parametrize("comma", [70, 74, 55, 54, 40])
def test_a_full_chunk_is_cut_after_a_comma_near_its_end(tok, comma):
    """A1111: the chunk is cut after its last comma when that is at most 20 tokens before its end."""
    text = " ".join(words(comma)) + ", " + " ".join(words(90 - comma, start=comma))
    ids = tok.encode(text)
    assert ids[comma] == tok.encode(",")[0] and len(ids) == 91
    cut = comma + 1 if 75 - comma <= 20 else 75
    assert chunk_ids(tok, text).tolist() == [row(ids[:cut]), row(ids[cut:])]
    assert chunk_ids(tok, text, backtrack=0).tolist() == [row(ids[:75]), row(ids[75:])]


def test_break_starts_a_new_chunk(tok, sd):
    a, b = tok.encode("a red cat"), tok.encode("a blue dog")
    assert chunk_ids(tok, "a red cat BREAK a blue dog").tolist() == [row(a), row(b)]
    assert chunk_ids(tok, "a red cat\nBREAK\n\na blue dog BREAK").tolist() == [row(a), row(b)]
    assert chunk_ids(tok, "BREAK a red cat").tolist() == [row([]), row(a)]
    assert chunk_ids(tok, "a red cat BREAKFAST break").tolist() == [row(tok.encode("a red cat breakfast break"))]
    assert sd.encode_prompt("a red cat BREAK a blue dog", long_prompt="chunk").shape == (1, 154, 32)
    assert torch.equal(tok(["a BREAK b"]), torch.tensor([row(tok.encode("a break b"))]))  # truncate: plain text


def captured_embeddings(sd, monkeypatch, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cond, uncond) text embeddings StableDiffusion.__call__ hands its denoising loop."""
    seen = {}

    def denoise(latents, cond, uncond, *args, **kw):
        seen.update(cond=cond, uncond=uncond)
        return latents

    monkeypatch.setattr(sd, "denoise", denoise)
    sd(steps=1, width=32, height=32, long_prompt="chunk", progress=False, **kwargs)
    monkeypatch.undo()
    return seen["cond"], seen["uncond"]


def test_the_shorter_side_is_padded_with_the_empty_prompt(sd, monkeypatch):
    cond, uncond = captured_embeddings(sd, monkeypatch, prompt=LONG, negative_prompt="blurry")
    assert cond.shape == uncond.shape == (1, 154, 32)
    assert torch.equal(cond, sd.encode_prompt(LONG, long_prompt="chunk"))
    assert torch.equal(uncond[:, :77], sd.encode_prompt("blurry"))
    assert torch.equal(uncond[:, 77:], sd.encode_prompt(""))
    # A longer negative prompt: the prompt is padded, with the empty prompt at the prompt's clip skip.
    negative = " ".join(words(160))
    cond, uncond = captured_embeddings(sd, monkeypatch, prompt="a cat", negative_prompt=negative, clip_skip=1)
    assert cond.shape == uncond.shape == (1, 231, 32)
    assert torch.equal(uncond, sd.encode_prompt(negative, long_prompt="chunk"))
    assert torch.equal(cond[:, :77], sd.encode_prompt("a cat", 1))
    assert torch.equal(cond[:, 77:], sd.encode_prompt("", 1).repeat(1, 2, 1))
    cond, uncond = captured_embeddings(sd, monkeypatch, prompt=LONG, guidance=1.0)  # no negative side
    assert cond.shape == (1, 154, 32) and uncond is None


def test_chunks_change_the_image_with_and_without_an_image_prompt(sd):
    """End to end on a UNet with SD1.5's 16 cross-attention layers: the second chunk reaches the
    image, through the UNet's attention and through the IP-Adapter's decoupled attention."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=16, groups=8, heads=2, context_dim=32)).eval()
    model = StableDiffusion(unet, sd.vae, sd.text_encoder)
    layers = IPAdapterLayers([layer.to_q.out_features for layer in unet.cross_attention_layers()], context_dim=32)
    positive, negative = torch.randn(2, 1, 4, 32, generator=torch.Generator().manual_seed(1))

    def image(mode: str, hook=None) -> np.ndarray:
        out = model(LONG, "blurry", steps=2, width=64, height=64, seed=3, hook=hook, long_prompt=mode, progress=False)
        return np.asarray(out[0], dtype=np.int16)

    hook = ImagePromptAttention(layers, positive, negative, 1.0)
    plain = {mode: image(mode) for mode in LONG_PROMPT_MODES}
    with_image = {mode: image(mode, hook) for mode in LONG_PROMPT_MODES}
    for name, images in (("text only", plain), ("with an image prompt", with_image)):
        change = np.abs(images["chunk"] - images["truncate"]).max()
        print(f"{name}: chunk vs truncate, max pixel change {change}")
        assert change >= 8
    assert np.abs(with_image["chunk"] - plain["chunk"]).max() >= 8  # the image prompt acts beside 154 text tokens


def test_an_unknown_mode_is_refused(sd):
    with pytest.raises(ValueError, match="long_prompt must be one of truncate, chunk, got 'wrap'"):
        sd.encode_prompt("a cat", long_prompt="wrap")
