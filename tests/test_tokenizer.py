"""ipadapter_min.models.tokenizer against transformers' CLIPTokenizer built from the same vocabulary.

The reference is called as diffusers' SD pipelines call it:
tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
"""

import ast
import pathlib
import sys
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference_models
from ipadapter_min.models import tokenizer as T
from ipadapter_min.models import tokenizer_unicode as U
from ipadapter_min.models.tokenizer import Tokenizer



@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    tok = reference_models.clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    return tok


@pytest.fixture(scope="module")
def mine():
    return Tokenizer()


def ref_ids(ref, texts, max_length=77):
    out = ref(texts, padding="max_length", max_length=max_length, truncation=True,
              return_tensors="pt")
    return out.input_ids


def assert_same(ref, mine, texts):
    expected, got = ref_ids(ref, texts), mine(texts)
    assert got.dtype == torch.long
    assert got.shape == expected.shape
    assert torch.equal(got, expected), (texts, expected, got)


LONG_PROMPT = " ".join(f"word{i % 10} cat" if i % 3 else "photo" for i in range(100))

EXAMPLES = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT, highly detailed, 8k, trending on artstation!!!",
    "tabs\tand\nnewlines\r\n  and   repeated    spaces ",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷",
    "CJK 日本語のテキスト 中文 한국어",
    "accents: café naïve Ångström e\u0301",
    "don't you'll we're I've I'm he'd it's 'S 'SA ''s",
    "punctuation ... !!! ?!, (((masterpiece))) [bad:0.5] {a|b}",
    "numbers 1234 3.14 ٣٤ ½ ¹²³ Ⅻ",
    "ftfy would change these: ﬁ Ã© &amp;",
    "final sigma: ΟΔΟΣ ΑΣ Σ",
    "İstanbul KELVIN \u212a",
    "literal specials: a<|endoftext|>b <|startoftext|> <|ENDOFTEXT|> !<|endoftext|>!",
    "control \x00\x01\x1c\x1d\x1e\x1f\x7f chars",
    "unicode spaces\u00a0\u2003\u3000\u2028\u0085\u200b|",
    "new unicode: \U00010d50\U00010d40 \ua7cb\u1c89 \U00016ea0 and marks a\u0345\u07fd \U00011935\U00011930",
    LONG_PROMPT,
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_match_transformers(ref, mine, text):
    assert_same(ref, mine, text)


def test_batch_shapes_and_known_ids(ref, mine):
    ids = mine(["a photo of a cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[1].tolist() == [49406] + [49407] * 76
    assert mine("a photo of a cat").shape == (1, 77)
    assert_same(ref, mine, EXAMPLES)
    assert mine.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert mine.encode("") == []


def test_truncation_keeps_eos_last(ref, mine):
    ids = mine(LONG_PROMPT)
    assert len(mine.encode(LONG_PROMPT)) > 75
    assert ids[0, 0].item() == 49406 and ids[0, 76].item() == 49407
    assert ids[0, 1:76].tolist() == mine.encode(LONG_PROMPT)[:75]
    assert 49407 not in ids[0, 1:76].tolist()
    assert_same(ref, mine, [LONG_PROMPT, "short"])


def test_other_max_length(ref):
    mine16 = Tokenizer(max_length=16)
    texts = ["a photo of a cat", LONG_PROMPT, ""]
    assert torch.equal(mine16(texts), ref_ids(ref, texts, max_length=16))
    with pytest.raises(ValueError):
        Tokenizer(max_length=1)


# Fragments that hit the pipeline's corners, joined at random.
_FRAGMENTS = [
    "a", "Photo", "CAT", " ", "  ", "\t", "\n", "\x1c", "\x00", "\u00a0", "\u3000", "\u200b",
    "'s", "'S", "'ll", "'", "''", "!", "...", "<|", "|>", "<|endoftext|>", "<|startoftext|>",
    "<|ENDOFTEXT|>", "1", "42", "½", "٣", "Σ", "ΟΔΟΣ", "ß", "İ", "ﬁ", "\u212a", "é", "e\u0301",
    "\u0301", "\u0345", "\u07fd", "\U00011935", "\U00011930", "\u1100\u1161\u11a8", "日本", "😀",
    "👍🏽", "\u200d", "\U00010d50", "\U00016ea0", "\ua7cb", "\U00010d40", "Ã©",
]
texts = (
    st.text()
    | st.text(st.characters(codec="utf-8"), max_size=200)
    | st.lists(st.sampled_from(_FRAGMENTS), max_size=100).map("".join)
    | st.lists(st.sampled_from(["a", "photo", "of", "cat", "highly", "detailed", ","]),
               min_size=60, max_size=120).map(" ".join)
)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(texts, min_size=1, max_size=3))
def test_hypothesis_matches_transformers(ref, mine, batch):
    assert_same(ref, mine, batch)


@pytest.mark.slow  # every code point
def test_unicode_tables_match_tokenizers_everywhere():
    """The letter / number / space classes, the lower-case map and NFC's behaviour agree with
    the Rust code behind transformers on every code point."""
    from tokenizers import Regex, normalizers

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    everything = "".join(chars)

    def onig_class(pattern):  # the characters `pattern` matches, by the reference's regex engine
        marked = normalizers.Replace(Regex(pattern), "\x00").normalize_str(everything)
        return {c for c, m in zip(chars, marked) if m == "\x00" and c != "\x00"}

    char_class = U.char_class.__wrapped__  # uncached: the cache would only churn here
    classes = {c: char_class(c) for c in chars}
    for kind, pattern in [("L", r"\p{L}"), ("N", r"\p{N}"), ("S", r"\s")]:
        expected = onig_class(pattern)
        got = {c for c, k in classes.items() if k == kind}
        assert got == expected, (kind, [hex(ord(c)) for c in sorted(got ^ expected)[:20]])

    # The reference lower-cases character by character, so one long string tests them all.
    lowercase = normalizers.Lowercase()
    if U.lowercase(everything) != lowercase.normalize_str(everything):
        bad = [c for c in chars if U.lowercase(c) != lowercase.normalize_str(c)]
        pytest.fail(f"lower case differs on {[hex(ord(c)) for c in bad[:20]]}")

    # NFC: canonical reordering (a probe for each character's combining class: does it move
    # across U+0345, class 240, or U+0334, class 1?) and composition of every decomposition.
    nfc = normalizers.NFC()
    for probe in (["a\u0345" + c + "\u0334" for c in chars],
                  [unicodedata.normalize("NFD", c) for c in chars]):
        text = " ".join(probe)
        if U.nfc(text) != nfc.normalize_str(text):
            bad = [p for p in probe if U.nfc(p) != nfc.normalize_str(p)]
            pytest.fail(f"NFC differs on {[[hex(ord(c)) for c in p] for p in bad[:10]]}")


def test_runtime_imports_stay_light():
    """Runtime code uses the standard library and torch only (no transformers, tokenizers,
    open_clip, ftfy or regex)."""
    imported = set()
    sources = [pathlib.Path(module.__file__).read_text(encoding="utf-8") for module in (T, U)]
    for node in (node for source in sources for node in ast.walk(ast.parse(source))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            assert node.module == "tokenizer_unicode", node.module  # the tokenizer's one import of ours
    allowed = set(sys.stdlib_module_names) | {"torch", "numpy"}
    assert imported <= allowed, imported - allowed
