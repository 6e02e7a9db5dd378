"""Requantization: untouched experts keep their bytes, changed ones use the canonical rule, the report is right."""

from __future__ import annotations

import json

import pytest
import torch

from gptoss_train.quant import mxfp4
from gptoss_train.quant.requantize import RequantReport, requantize_experts


def _base(experts=3, rows=64, cols=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(experts, rows, cols, generator=generator) * 0.02
    # noclip: about a quarter of its blocks are non-canonical, so a decode -> encode round trip would change bytes
    # (formats.md §3.4); pass-through must still return them unchanged.
    blocks, scales = mxfp4.encode(weight, rule="noclip")
    return blocks, scales, mxfp4.decode(blocks, scales, dtype=torch.float32)


def test_unchanged_tensor_keeps_original_bytes_even_when_reencoding_would_not():
    blocks, scales, w0 = _base()
    reencoded_blocks, reencoded_scales = mxfp4.encode(w0, rule="best")
    assert not (torch.equal(reencoded_blocks, blocks) and torch.equal(reencoded_scales, scales)), (
        "fixture should contain non-canonical blocks"
    )
    out_blocks, out_scales, report = requantize_experts("t", blocks, scales, w0.to(torch.bfloat16))
    assert torch.equal(out_blocks, blocks) and torch.equal(out_scales, scales)
    assert report.experts_changed == 0 and report.blocks_changed == 0
    assert report.rel_error == 0.0 and report.delta_cosine is None


def test_only_changed_expert_is_reencoded_with_kept_scales():
    blocks, scales, w0 = _base()
    tuned = w0.clone()
    tuned[1] += 0.002 * torch.randn_like(tuned[1])
    out_blocks, out_scales, report = requantize_experts("t", blocks, scales, tuned, rule="best")
    for expert in (0, 2):
        assert torch.equal(out_blocks[expert], blocks[expert]) and torch.equal(out_scales[expert], scales[expert])
    want_blocks, want_scales = mxfp4.encode(tuned[1], rule="best", keep_scales=scales[1])
    assert torch.equal(mxfp4.decode(out_blocks[1], out_scales[1], dtype=torch.float32),
                       mxfp4.decode(want_blocks, want_scales, dtype=torch.float32))
    assert report.experts == 3 and report.experts_changed == 1
    assert 0 < report.blocks_changed <= report.blocks // 3
    # a block whose values did not move keeps its bytes (no sign-of-zero churn)
    decoded_new = mxfp4.decode(out_blocks[1], out_scales[1], dtype=torch.float32).unflatten(-1, (-1, 32))
    decoded_old = w0[1].unflatten(-1, (-1, 32))
    same = (decoded_new == decoded_old).all(-1)
    assert torch.equal(out_blocks[1][same], blocks[1][same])
    assert int((~same).sum()) == report.blocks_changed
    # independent recomputation of the delta metrics
    wq = mxfp4.decode(out_blocks[1], out_scales[1], dtype=torch.float64)
    delta = tuned[1].double() - w0[1].double()
    kept = wq - w0[1].double()
    cosine = float((kept * delta).sum() / (kept.norm() * delta.norm()))
    assert report.delta_cosine == pytest.approx(cosine, rel=1e-4)
    assert report.delta_norm_ratio == pytest.approx(float(kept.norm() / delta.norm()), rel=1e-4)
    assert report.rel_error == pytest.approx(float((wq - tuned[1].double()).norm() / tuned.double().norm()), rel=1e-4)


def test_large_delta_survives_small_delta_mostly_does_not():
    blocks, scales, w0 = _base(experts=1, rows=128, cols=128)
    direction = torch.randn_like(w0)
    _, _, big = requantize_experts("big", blocks, scales, w0 + 0.5 * w0.std() * direction)
    _, _, small = requantize_experts("small", blocks, scales, w0 + 0.002 * w0.std() * direction)
    assert big.delta_cosine > 0.9
    assert small.delta_cosine < big.delta_cosine
    # rounding erases a tiny fine-tune: the error is as large as the delta itself (DESIGN.md §1.3)
    assert small.error_to_delta > 0.9 and small.delta_cosine < 0.5


def test_shape_mismatch_says_to_transpose():
    blocks, scales, w0 = _base(rows=64, cols=96)
    with pytest.raises(ValueError, match="transposed"):
        requantize_experts("t", blocks, scales, w0.transpose(-1, -2))


def test_report_json_and_table(tmp_path):
    blocks, scales, w0 = _base()
    tuned = w0.clone()
    tuned[0] *= 1.01
    report = RequantReport(rule="best")
    report.tensors.append(requantize_experts("layer.0.gate_up", blocks, scales, tuned)[2])
    report.tensors.append(requantize_experts("layer.0.down", blocks, scales, w0)[2])
    path = report.write_json(tmp_path / "report.json")
    data = json.loads(path.read_text())
    assert data["summary"]["experts_changed"] == 1 and data["summary"]["experts"] == 6
    assert data["tensors"][1]["delta_cosine"] is None
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(report.rich_table())
    assert "layer.0.gate_up" in console.export_text()
