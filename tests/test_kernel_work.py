"""ipadapter_min.benchmarks.kernel_work: the issued-vs-useful arithmetic, checked by hand and against the launcher."""
import json

import pytest
import torch

from ipadapter_min.benchmarks import kernel_work


def test_useful_work_is_the_exact_formula_and_never_exceeds_issued():
    rows = kernel_work.rows()
    # 4 SD1.5 shapes × 3 image-token counts × 2 kernels
    assert len(rows) == 24 and {r["kernel"] for r in rows} == {"d608ad0", "v2"}
    for r in rows:
        bh, lq, d, keys = 2 * 8, r["len_q"], r["head_dim"], 77 + r["image_tokens"]
        # Q·Kᵀ and P·V, 2 FLOPs per multiply-add each, over the real queries, head dims and keys
        assert r["useful_mma_flops"] == bh * lq * d * keys * 4, r
        assert r["useful_exp2"] == bh * lq * keys, r
        assert r["useful_mma_flops"] <= r["mma_flops"] and r["useful_exp2"] <= r["exp2"], r
    assert sum(r["layers"] for r in rows) == 16 * 3 * 2  # each kernel × token count covers the 16 layers


def test_the_headline_shape_by_hand():
    """Lq 4096, d 40 (padded to 64), 77 text + 4 image tokens, 16 batch·heads, 128-row blocks."""
    old = kernel_work.work("d608ad0", 4096, 8, 40, 4)
    new = kernel_work.work("v2", 4096, 8, 40, 4)
    assert old["programs"] == new["programs"] == 32 * 16
    # old: two masked 64-key text tiles and one 16-key image tile, all online (one α exp2 per row each)
    assert old["mma_flops"] == 512 * 4 * 128 * 64 * (64 + 64 + 16)
    assert old["exp2"] == 512 * 128 * (65 + 65 + 17)
    # v2: 64 + a 16-wide tail, online; the 4 image tokens in one exact 16-wide tile (no α)
    assert (new["text_tiles"], new["image_tiles"]) == ("64+16", "16 exact")
    assert new["mma_flops"] == 512 * 4 * 128 * 64 * (64 + 16 + 16)
    assert new["exp2"] == 512 * 128 * (65 + 17 + 16)
    # the figures for the old kernel (~36% of MMA, ~57% of exp2 useful), and v2 above them
    assert old["useful_mma_flops"] / old["mma_flops"] == pytest.approx(0.352, abs=0.001)
    assert old["useful_exp2"] / old["exp2"] == pytest.approx(0.551, abs=0.001)
    assert new["useful_mma_flops"] / new["mma_flops"] > 0.5 and new["useful_exp2"] / new["exp2"] > 0.8
    # the smallest layers: 4× the programs of the old 64-row blocks
    smallest = [kernel_work.work(name, 64, 8, 160, 4)["programs"] for name in ("d608ad0", "v2")]
    assert smallest == [16, 64]


class _Recorder:
    """Stands in for the @triton.jit kernel: ``kernel[grid](...)`` records and runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs))


@pytest.mark.parametrize("lq,d,li,batch", [(4096, 40, 4, 2), (1024, 80, 257, 16), (64, 160, 16, 64)])
def test_the_v2_plan_is_what_the_launcher_passes(lq, d, li, batch, monkeypatch):
    """The plan's blocks and key tiles against the launch the real launcher makes for tensors of
    that shape, counted here from its constants. (CPU tensors get the table's BLOCK_M, a GPU's
    grid-sized one only on CUDA: the batches here are large enough for the two to agree.)"""
    from ipadapter_min.kernels import triton_decoupled_attention as module
    recorder = _Recorder()
    monkeypatch.setattr(module, "_decoupled_attention_kernel", recorder)
    q, kt, vt, ki, vi = (torch.zeros(batch, 8, n, d, dtype=torch.float16) for n in (lq, 77, 77, li, li))
    module.launch(q, kt, vt, ki, vi, 0.5)
    ((grid, k),) = recorder.launches
    row = kernel_work.work("v2", lq, 8, d, li, batch=batch)
    assert row["block_m"] == module.default_config(d, 77, li, torch.float16).block_m
    assert grid == (row["programs"],) and (k["BLOCK_M"], k["BLOCK_D"]) == (row["block_m"], row["block_d"])
    issued_keys = row["mma_flops"] // (row["programs"] * 4 * row["block_m"] * row["block_d"])
    text = 77 // k["BLOCK_NT"] * k["BLOCK_NT"] + (k["TAIL_NT"] if 77 % k["BLOCK_NT"] else 0)
    image = k["BLOCK_NI"] if k["IMAGE_ONE_TILE"] else (
        li // k["BLOCK_NI"] * k["BLOCK_NI"] + (k["TAIL_NI"] if li % k["BLOCK_NI"] else 0))
    assert issued_keys == text + image
    assert k["IMAGE_ONE_TILE"] == (li <= 16)


def test_command_line_prints_a_table_and_json(capsys):
    kernel_work.main([])
    text = capsys.readouterr().out
    assert "4096/40" in text and "64+16" in text and "One UNet call" in text
    kernel_work.main(["--json"])
    data = json.loads(capsys.readouterr().out)
    assert len(data["rows"]) == 24 and len(data["per_unet_call"]) == 6
