"""Loading: same logits as transformers' own MXFP4 loader, in both expert modes and from the original/ layout;
save_pretrained round-trips (the transformers 5.23 bug, cpu-gotchas #13); MXFP4 mode keeps no dense expert copy."""

from __future__ import annotations

import pytest
import torch

from gptoss_train.model.checkpoint import CheckpointError, write_original_layout
from gptoss_train.model.load import Mxfp4GptOssExperts, expert_sources, load_model, untouched_blocks
from gptoss_train.quant import mxfp4


@torch.no_grad()
def _logits(model, input_ids):
    return model(input_ids).logits


def test_dense_loader_matches_transformers_from_pretrained(tiny_checkpoint, dense_model, input_ids):
    from transformers import AutoModelForCausalLM

    outside = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)  # dequantizes on CPU
    ours = _logits(dense_model, input_ids)
    theirs = _logits(outside, input_ids)
    assert ours.shape == (2, 24, 201088)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # and the expert weights themselves are the same values
    torch.testing.assert_close(
        dense_model.model.layers[1].mlp.experts.down_proj, outside.model.layers[1].mlp.experts.down_proj, rtol=0, atol=0
    )


def test_mxfp4_mode_same_logits_and_no_dense_expert_copy(dense_model, mxfp4_model, input_ids):
    torch.testing.assert_close(_logits(mxfp4_model, input_ids), _logits(dense_model, input_ids), rtol=0, atol=1e-6)
    experts = mxfp4_model.model.layers[0].mlp.experts
    assert isinstance(experts, Mxfp4GptOssExperts)
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and experts.gate_up_proj_blocks.shape == (4, 128, 2, 16)
    for name in ("gate_up_proj", "down_proj"):
        placeholder = getattr(experts, name)
        assert placeholder.stride() == (0, 0, 0) and placeholder.untyped_storage().nbytes() == 4
        assert not placeholder.requires_grad
    assert experts.gate_up_proj.shape == dense_model.model.layers[0].mlp.experts.gate_up_proj.shape
    # .to() keeps the placeholders tiny
    experts.to(torch.float32)
    assert experts.gate_up_proj.untyped_storage().nbytes() == 4


def test_default_dtype_and_norms(tiny_checkpoint):
    model = load_model(tiny_checkpoint, experts="mxfp4", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32  # as transformers keeps them
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert model.generation_config.eos_token_id == [200002, 199999, 200012]
    assert model.config.quantization_config if hasattr(model.config, "quantization_config") else True
    assert not getattr(model.config, "quantization_config", None)


def test_save_pretrained_reload_keeps_the_experts(tmp_path, dense_model, input_ids):
    """cpu-gotchas #13: after transformers' dequantizing load, save_pretrained writes *_blocks names and the reload
    re-initialises the experts. Our loader attaches no weight conversions, so the round trip keeps them."""
    from transformers import AutoModelForCausalLM

    dense_model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), dtype=torch.float32)
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias"):
        assert torch.equal(
            getattr(reloaded.model.layers[0].mlp.experts, name), getattr(dense_model.model.layers[0].mlp.experts, name)
        )
    torch.testing.assert_close(_logits(reloaded, input_ids), _logits(dense_model, input_ids), rtol=0, atol=0)


def test_original_layout_loads_to_the_same_model(tmp_path, tiny_checkpoint, dense_model, input_ids):
    folder = write_original_layout(tiny_checkpoint, tmp_path / "orig")
    assert sorted(p.name for p in (folder / "original").iterdir()) == ["config.json", "dtypes.json", "model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(folder / "original" / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        assert handle.get_tensor("block.0.attn.qkv.weight").shape == (4 * 16 + 2 * 2 * 16, 64)
    assert "block.1.mlp.mlp1_weight.blocks" in names and "unembedding.weight" in names
    for mode in ("bf16", "mxfp4"):
        model = load_model(folder, experts=mode)
        torch.testing.assert_close(_logits(model, input_ids), _logits(dense_model, input_ids), rtol=0, atol=0)


def test_expert_sources_and_untouched_blocks(tiny_checkpoint, dense_model, mxfp4_model):
    from gptoss_train.model.checkpoint import CheckpointReader

    reader = CheckpointReader.open(tiny_checkpoint)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    for model in (dense_model, mxfp4_model):
        blocks, scales = expert_sources(model)[name]
        assert torch.equal(blocks, reader.get(name + "_blocks")) and torch.equal(scales, reader.get(name + "_scales"))
    assert mxfp4_model.model.layers[1].mlp.experts.gate_up_proj_blocks is expert_sources(mxfp4_model)[name][0]
    assert untouched_blocks(dense_model, name).all()
    with torch.no_grad():
        weight = dense_model.model.layers[1].mlp.experts.gate_up_proj  # [E, in=64, out=128]
        saved = weight[2, 33, 5].item()
        weight[2, 33, 5] += 1.0  # expert 2, output row 5, input column 33 -> block 1
        mask = untouched_blocks(dense_model, name)
        weight[2, 33, 5] = saved
    assert mask.shape == (4, 128, 2) and (~mask).sum() == 1 and not mask[2, 5, 1]


def test_bad_paths_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="no gpt-oss checkpoint"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_model(tmp_path / "missing" / "deeper")
    with pytest.raises(ValueError, match="experts must be"):
        load_model(tmp_path, experts="fp8")


def test_decode_in_loader_is_the_codec(tiny_checkpoint, dense_model):
    from gptoss_train.model.checkpoint import CheckpointReader

    reader = CheckpointReader.open(tiny_checkpoint)
    blocks = reader.get("model.layers.0.mlp.experts.down_proj_blocks")
    scales = reader.get("model.layers.0.mlp.experts.down_proj_scales")
    expected = mxfp4.decode(blocks, scales, dtype=torch.float32, transpose=True)
    assert torch.equal(dense_model.model.layers[0].mlp.experts.down_proj, expected)
