"""The README's "Reading the code" list: the paper's method on SD1.5, readable in one sitting.

It names every part of inference in reading order, totals at most 1,600 lines, leaves the
references' extras out, and writes the shape beside every reshape and attention call.
"""
import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 1600
# The parts of SD1.5 + IP-Adapter inference, in the order a reader meets them.
PARTS = ["models/tokenizer.py", "models/text_encoder.py", "models/unet.py", "models/vae.py", "samplers/ddim.py",
         "samplers/cfg.py", "models/image_encoder.py", "ip_adapter/projection.py", "ip_adapter/hook.py",
         "pipelines/image_prompts.py"]
# The image prompt's extras (ComfyUI's options, several adapters, the other releases' projections):
# the core reads without them. (The SD1.5 loop's own features, editing, controls and long prompts,
# it calls by their entry points.)
EXTRAS = {"hook_options", "weight_types", "embeds_scaling", "masks", "combine", "negative_noise", "several",
          "step_ranges", "resampler", "mlp_projection", "image_prompt_input"}
# A reshape or an attention call ...
SHAPE_CHANGE = re.compile(r"\.(reshape|view|flatten|unflatten|transpose|permute)\(|\brearrange\(|"
                          r"scaled_dot_product_attention\(|\battention\(|\bhook\(self\.layer")
# ... and its comment: a parenthesised shape of two or more sizes, e.g. "# (B, heads, Lq, d)".
SHAPE_COMMENT = re.compile(r"#.*\([^()]+,[^()]*\)")


def reading_list() -> list[str]:
    text = (ROOT / "README.md").read_text().split("\n## Reading the code\n", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^\d+\. (.*(?:\n   .*)*)", text, flags=re.M)
    return [path for item in items for path in re.findall(r"`(ipadapter_min/[\w/]+\.py)`", item)]


def logical_lines(source: str) -> list[tuple[int, str, list[str]]]:
    """(first line, its code without strings or spaces, its comments) of each statement of ``source``;
    a ``def`` line counts as no code (its arguments are no calls)."""
    lines, code, comments, start = [], [], [], None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            if token.type != tokenize.NL or not code:  # an NL inside brackets continues the statement
                if code and code[0] != "def":
                    lines.append((start, "".join(code), comments))
                code, comments, start = [], [], None
            continue
        if token.type == tokenize.COMMENT:
            comments.append(token.string)
        elif token.type not in (tokenize.STRING, tokenize.INDENT, tokenize.DEDENT):
            start = start or token.start[0]
            code.append(token.string)
    return lines


def test_the_list_names_the_parts_of_inference_in_order():
    files = reading_list()
    assert files, "no files found in the README's Reading the code section"
    missing = [f for f in files if not (ROOT / f).is_file()]
    assert not missing, missing
    positions = [next((i for i, f in enumerate(files) if f.endswith(part)), None) for part in PARTS]
    assert None not in positions, [part for part, i in zip(PARTS, positions) if i is None]
    assert positions == sorted(positions), "the parts are out of reading order"
    assert len(set(files)) == len(files)


def test_the_list_is_under_1600_lines():
    counts = {f: len((ROOT / f).read_text().splitlines()) for f in reading_list()}
    print({Path(f).name: n for f, n in counts.items()}, sum(counts.values()))
    assert sum(counts.values()) <= MAX_LINES, f"{sum(counts.values())} lines, the most is {MAX_LINES}"


def test_the_listed_files_leave_the_extras_out():
    """No listed file imports an extra: each reaches the core only through its seam."""
    for f in reading_list():
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {node.module.rpartition(".")[2] if node.module else ""} | {a.name for a in node.names}
                assert not names & EXTRAS, f"{f}:{node.lineno} imports {names & EXTRAS}"


def test_every_reshape_and_attention_call_has_its_shape():
    unexplained = []
    for f in reading_list():
        for line, code, comments in logical_lines((ROOT / f).read_text()):
            if SHAPE_CHANGE.search(code) and not any(SHAPE_COMMENT.search(c) for c in comments):
                unexplained.append(f"{f}:{line}: {code[:80]}")
    assert not unexplained, "\n".join(unexplained)


def test_the_shape_check_finds_a_missing_comment():
    """The checker itself: a reshape without its shape is found, one with it is not, and a
    statement continued over lines counts its comments on any of them."""
    bare = "x = y.reshape(b, -1)\n"
    commented = "x = y.reshape(b, -1)  # (B, n)\n"
    continued = "q, k = (f(t).view(b, n)\n          for t in ts)  # (b, n) each\n"
    found = [bool(SHAPE_CHANGE.search(code)) and not any(SHAPE_COMMENT.search(c) for c in comments)
             for source in (bare, commented, continued) for _, code, comments in logical_lines(source)]
    assert found == [True, False, False]
