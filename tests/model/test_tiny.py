"""The tiny checkpoint is written exactly in the hub layout (formats.md §1) and is MXFP4-exact."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from gptoss_train.model.checkpoint import MODULES_TO_NOT_CONVERT
from gptoss_train.model.tiny import GENERATION_CONFIG, build_checkpoint, preset_config
from gptoss_train.quant import mxfp4


def _tensors_by_shard(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / file), framework="pt") as handle:
            shards[file] = {name: handle.get_tensor(name) for name in handle.keys()}
            assert handle.metadata() == {"format": "pt"}
    return index, shards


def test_tiny_checkpoint_hub_layout(tiny_checkpoint):
    folder = tiny_checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {"modules_to_not_convert": MODULES_TO_NOT_CONVERT, "quant_method": "mxfp4"}
    assert config["vocab_size"] == 201088 and config["num_hidden_layers"] == 2
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["num_experts_per_tok"] == config["experts_per_token"] == 2
    assert config["hidden_size"] % 32 == 0 and config["intermediate_size"] % 32 == 0
    assert json.loads((folder / "generation_config.json").read_text()) == GENERATION_CONFIG
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()

    index, shards = _tensors_by_shard(folder)
    # hub naming: zero-based, "of" the last index (20b: model-00000-of-00002 ... model-00002-of-00002)
    assert sorted(shards) == [f"model-0000{i}-of-00002.safetensors" for i in range(3)]
    tensors = {name: t for shard in shards.values() for name, t in shard.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for name, tensor in tensors.items():
        if name.endswith(("_blocks", "_scales")):
            assert tensor.dtype == torch.uint8, name
        else:
            assert tensor.dtype == torch.bfloat16, name
    E, H, I = 4, 64, 64
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (E, 2 * I, H // 32, 16)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_scales"].shape == (E, 2 * I, H // 32)
    assert tensors["model.layers.1.mlp.experts.down_proj_blocks"].shape == (E, H, I // 32, 16)
    assert tensors["model.layers.1.mlp.experts.gate_up_proj_bias"].shape == (E, 2 * I)
    assert tensors["model.layers.0.self_attn.sinks"].shape == (4,)
    assert tensors["lm_head.weight"].shape == (201088, H)
    assert not any(name.endswith("gate_up_proj") or name.endswith("down_proj") for name in tensors)
    # _blocks and _scales of one tensor share a shard, blocks written first
    for file, shard in shards.items():
        names = list(shard)
        for name in names:
            if name.endswith("_blocks"):
                assert name.replace("_blocks", "_scales") in shard
    with open(folder / sorted(shards)[1], "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    offsets = {name: meta["data_offsets"][0] for name, meta in header.items() if name != "__metadata__"}
    blocks = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    assert offsets[blocks] < offsets[blocks.replace("_blocks", "_scales")]


def test_tiny_experts_are_mxfp4_exact_and_realistic(tiny_checkpoint):
    _, shards = _tensors_by_shard(tiny_checkpoint)
    tensors = {name: t for shard in shards.values() for name, t in shard.items()}
    blocks = tensors["model.layers.0.mlp.experts.down_proj_blocks"]
    scales = tensors["model.layers.0.mlp.experts.down_proj_scales"]
    values = mxfp4.decode(blocks, scales, dtype=torch.float32)
    assert torch.equal(mxfp4.decode(*mxfp4.encode(values), dtype=torch.float32), values)
    assert 0.015 < values.std().item() < 0.025  # N(0, 0.02) through the encoder
    assert 0.015 < tensors["model.embed_tokens.weight"].float().std().item() < 0.025


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_checkpoint):
    a = build_checkpoint(tmp_path / "a", preset="tiny", seed=0)
    b = build_checkpoint(tmp_path / "b", preset="tiny", seed=1, layers=1)

    def digest(folder, name):
        return hashlib.sha256((folder / name).read_bytes()).hexdigest()

    for shard in ("model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors"):
        assert digest(a, shard) == digest(tiny_checkpoint, shard)
    assert json.loads((b / "config.json").read_text())["num_hidden_layers"] == 1
    assert digest(b, "model-00000-of-00002.safetensors") != digest(a, "model-00000-of-00002.safetensors")


def test_build_refuses_non_empty_folder_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_checkpoint(tmp_path / "out", preset="tiny")
    with pytest.raises(ValueError, match="multiple of 32"):
        build_checkpoint(tmp_path / "bad", preset="tiny", hidden=48)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_presets_have_the_real_shapes():
    c20, c120 = preset_config("20b"), preset_config("120b")
    assert (c20["num_hidden_layers"], c20["num_local_experts"], c20["hidden_size"]) == (24, 32, 2880)
    assert (c120["num_hidden_layers"], c120["num_local_experts"], c120["num_experts_per_tok"]) == (36, 128, 4)
    assert c120["layer_types"][:2] == ["sliding_attention", "full_attention"] and len(c120["layer_types"]) == 36


def test_cli_builds_a_checkpoint(tmp_path, capsys):
    from gptoss_train.cli.build_tiny import main

    with pytest.raises(SystemExit) as done:
        main([str(tmp_path / "cli"), "--layers", "1", "--experts", "2", "--top-k", "1", "--seed", "3"])
    assert done.value.code in (0, None)
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_local_experts"], config["num_experts_per_tok"]) == (1, 2, 1)
    with pytest.raises(SystemExit) as done:
        main([str(tmp_path / "cli")])
    assert done.value.code == 2
