"""The vLLM layout validator accepts our exports and names each kind of broken export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_train.export import export_model, validate_vllm_layout

L0 = "model.layers.0.mlp.experts"


@pytest.fixture(scope="module")
def exports(export_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("valid-exports")
    return {
        "mxfp4": export_model(export_base, out_dir=root / "mxfp4", format="mxfp4", progress=False),
        "bf16": export_model(export_base, out_dir=root / "bf16", format="bf16", progress=False),
    }


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_our_exports_are_valid(exports):
    assert validate_vllm_layout(exports["mxfp4"]) == []
    assert validate_vllm_layout(exports["bf16"]) == []


def test_missing_tensor(exports, tmp_path):
    folder = _copy(exports["mxfp4"], tmp_path / "x")
    _edit_tensors(folder, lambda t: t.pop("model.layers.1.self_attn.sinks"))
    problems = validate_vllm_layout(folder)
    assert any("missing tensor model.layers.1.self_attn.sinks" in p for p in problems), problems


def test_wrong_dtype(exports, tmp_path):
    folder = _copy(exports["mxfp4"], tmp_path / "x")

    def float_blocks(t):  # what transformers' save bug writes (cpu-gotchas #13)
        t[f"{L0}.down_proj_blocks"] = t[f"{L0}.down_proj_blocks"].to(torch.bfloat16)

    _edit_tensors(folder, float_blocks)
    problems = validate_vllm_layout(folder)
    assert any(f"{L0}.down_proj_blocks: dtype BF16, expected U8" in p for p in problems), problems


def test_padded_shape(exports, tmp_path):
    folder = _copy(exports["mxfp4"], tmp_path / "x")

    def pad(t):
        b = t[f"{L0}.gate_up_proj_blocks"]
        t[f"{L0}.gate_up_proj_blocks"] = torch.cat([b, torch.zeros_like(b[:, :, :1])], dim=2)

    _edit_tensors(folder, pad)
    problems = validate_vllm_layout(folder)
    assert any(f"{L0}.gate_up_proj_blocks: shape" in p and "padded" in p for p in problems), problems


def test_config_says_mxfp4_but_experts_dense(exports, tmp_path):
    folder = _copy(exports["bf16"], tmp_path / "x")
    _edit_config(folder, lambda c: c.update(quantization_config={"quant_method": "mxfp4"}))
    problems = validate_vllm_layout(folder)
    assert any("quant_method 'mxfp4' but the experts are dense" in p for p in problems), problems


def test_blocks_without_quantization_config(exports, tmp_path):
    folder = _copy(exports["mxfp4"], tmp_path / "x")
    _edit_config(folder, lambda c: c.pop("quantization_config"))
    problems = validate_vllm_layout(folder)
    assert any("no quantization_config" in p for p in problems), problems


def test_dense_layout_wrong_orientation(exports, tmp_path):
    folder = _copy(exports["bf16"], tmp_path / "x")

    def transpose(t):  # [E, 2I, H] instead of [E, H, 2I]: the reference orientation, not HF's
        t[f"{L0}.gate_up_proj"] = t[f"{L0}.gate_up_proj"].transpose(-1, -2).contiguous()

    _edit_tensors(folder, transpose)
    problems = validate_vllm_layout(folder)
    assert any(f"{L0}.gate_up_proj: shape" in p for p in problems), problems


def test_unexpected_tensor(exports, tmp_path):
    folder = _copy(exports["mxfp4"], tmp_path / "x")
    _edit_tensors(folder, lambda t: t.update({"model.layers.0.mlp.experts.gate_up_proj_lora_A": torch.zeros(2, 2)}))
    problems = validate_vllm_layout(folder)
    assert any("unexpected tensor model.layers.0.mlp.experts.gate_up_proj_lora_A" in p for p in problems), problems


def test_blocks_and_scales_in_different_shards(exports, tmp_path):
    folder = _copy(exports["mxfp4"], tmp_path / "x")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    scales_name = f"{L0}.gate_up_proj_scales"
    second = {scales_name: tensors.pop(scales_name)}
    save_file(tensors, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(second, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {name: "model-00001-of-00002.safetensors" for name in tensors}
    weight_map[scales_name] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    problems = validate_vllm_layout(folder)
    assert problems == [
        f"{L0}.gate_up_proj_blocks is in model-00001-of-00002.safetensors but {scales_name} is in "
        "model-00002-of-00002.safetensors: keep both in one shard (llama.cpp's converter pairs them in order)"
    ]


def test_index_inconsistent(exports, tmp_path):
    folder = _copy(exports["mxfp4"], tmp_path / "x")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    weight_map = {name: "model-00001-of-00001.safetensors" for name in tensors}
    weight_map.pop("model.norm.weight")  # stored but not indexed
    weight_map["model.layers.0.ghost"] = "model-00001-of-00001.safetensors"  # indexed but not stored
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"  # shard that does not exist
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    problems = validate_vllm_layout(folder)
    joined = "\n".join(problems)
    assert "model.norm.weight is in model-00001-of-00001.safetensors but missing from" in joined
    assert "maps model.layers.0.ghost to model-00001-of-00001.safetensors, but that shard has no such tensor" in joined
    assert "names shard model-00002-of-00002.safetensors, which is missing" in joined


def test_wrong_model_type_and_missing_config(exports, tmp_path):
    folder = _copy(exports["mxfp4"], tmp_path / "x")
    _edit_config(folder, lambda c: c.update(model_type="llama"))
    assert any("model_type is 'llama'" in p for p in validate_vllm_layout(folder))
    (folder / "config.json").unlink()
    assert validate_vllm_layout(folder) == [f"no config.json in {folder}"]
