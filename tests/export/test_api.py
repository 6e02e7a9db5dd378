"""export_model end to end on the tiny model: bytes, logits in plain transformers, atomicity, serving files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_train.export import ExportError, export_model, validate_vllm_layout
from gptoss_train.export.safetensors_io import CheckpointError, SafetensorsFolder
from gptoss_train.quant import mxfp4

load_float32 = None  # set by the autouse fixture below (conftest's loader)


@pytest.fixture(autouse=True, scope="module")
def _loader(load_f32):
    global load_float32
    load_float32 = load_f32


PROMPT = torch.tensor([[200006, 17360, 200008, 12194, 11, 1495, 553, 481, 30, 200007, 200006, 173781]])


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    reader = SafetensorsFolder(folder)
    return {name: reader.get(name) for name in reader.keys()}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits[0]


@pytest.fixture(scope="module")
def tuned_model(export_base):
    """Our model after a 'fine-tune': layer 0 expert 1 (gate_up) and an attention matrix nudged; the rest untouched."""
    model = load_float32(export_base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        experts = model.model.layers[0].mlp.experts
        w = experts.gate_up_proj[1]
        experts.gate_up_proj[1] += 0.05 * w.std() * torch.randn(w.shape, generator=generator)
        q = model.model.layers[1].self_attn.q_proj.weight
        q += 0.05 * q.std() * torch.randn(q.shape, generator=generator)
    return model


def test_unchanged_base_round_trips_bytes_and_logits(export_base, tmp_path):
    out = export_model(export_base, out_dir=tmp_path / "same", format="mxfp4", progress=False)
    base, exported = _tensors(export_base), _tensors(out)
    assert base.keys() == exported.keys()
    for name in base:
        assert base[name].dtype == exported[name].dtype and torch.equal(base[name], exported[name]), name
    assert torch.equal(_logits(load_float32(export_base)), _logits(load_float32(out)))
    assert not (out / "requantize_report.json").exists()  # nothing was requantized


def test_tuned_model_to_mxfp4_loads_in_transformers(export_base, tuned_model, tmp_path):
    reports = []
    out = export_model(export_base, model=tuned_model, out_dir=tmp_path / "tuned", format="mxfp4",
                       progress=False, on_report=reports.append)
    assert validate_vllm_layout(out) == []
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    base, exported = _tensors(export_base), _tensors(out)
    # untouched experts: the input's bytes; the tuned expert: re-encoded
    for proj, expert in [("down_proj", 0), ("down_proj", 1), ("gate_up_proj", 0), ("gate_up_proj", 2)]:
        for kind in ("blocks", "scales"):
            name = f"model.layers.0.mlp.experts.{proj}_{kind}"
            assert torch.equal(exported[name][expert], base[name][expert]), (name, expert)
    for name in ("model.layers.1.mlp.experts.gate_up_proj_blocks", "model.layers.1.mlp.experts.down_proj_scales"):
        assert torch.equal(exported[name], base[name])
    assert not torch.equal(exported["model.layers.0.mlp.experts.gate_up_proj_blocks"][1],
                           base["model.layers.0.mlp.experts.gate_up_proj_blocks"][1])

    # logits: exactly our model with its experts put through the same quantization ...
    loaded = load_float32(out)
    reference = load_float32(export_base)
    reference.load_state_dict(tuned_model.state_dict())
    with torch.no_grad():
        experts = reference.model.layers[0].mlp.experts
        experts.gate_up_proj.copy_(mxfp4.decode(exported["model.layers.0.mlp.experts.gate_up_proj_blocks"],
                                                exported["model.layers.0.mlp.experts.gate_up_proj_scales"],
                                                dtype=torch.float32, transpose=True))
        attention = reference.model.layers[1].self_attn.q_proj.weight
        attention.copy_(attention.to(torch.bfloat16).float())  # the export stores bf16 like the base
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=0, atol=1e-5)
    # ... and within MXFP4 + bf16 error of the unquantized tuned model
    ours = _logits(tuned_model)
    error = (_logits(loaded) - ours).abs()
    assert float(error.mean()) < 0.05 * float(ours.abs().mean())
    assert torch.equal(_logits(loaded).argmax(-1), ours.argmax(-1))

    report = json.loads((out / "requantize_report.json").read_text())
    assert report["summary"]["experts_changed"] == 1 and len(reports) == 1
    gate_up = next(t for t in report["tensors"] if t["name"] == "model.layers.0.mlp.experts.gate_up_proj")
    assert gate_up["experts_changed"] == 1 and 0 < gate_up["blocks_changed_fraction"] < 0.34
    assert -1.0 <= gate_up["delta_cosine"] <= 1.0 and gate_up["rel_error"] > 0


def test_bf16_export_is_dense_and_matches(export_base, tuned_model, tmp_path):
    out = export_model(export_base, model=tuned_model, out_dir=tmp_path / "bf16", format="bf16", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    tensors = _tensors(out)
    gate_up = tensors["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.dtype == torch.bfloat16 and tuple(gate_up.shape) == tuple(
        tuned_model.model.layers[0].mlp.experts.gate_up_proj.shape)
    assert not any(name.endswith(("_blocks", "_scales")) for name in tensors)
    loaded = load_float32(out)
    ours = _logits(tuned_model)
    assert float((_logits(loaded) - ours).abs().mean()) < 0.02 * float(ours.abs().mean())


def test_merged_folder_as_model_gives_same_export(export_base, tuned_model, tmp_path):
    dense = export_model(export_base, model=tuned_model, out_dir=tmp_path / "dense", format="bf16", progress=False)
    from_folder = export_model(export_base, model=dense, out_dir=tmp_path / "a", format="mxfp4", progress=False)
    # the same tuned weights, rounded to bf16 first, held in memory
    bf16_model = load_float32(dense)
    from_memory = export_model(export_base, model=bf16_model, out_dir=tmp_path / "b", format="mxfp4",
                               progress=False)
    a, b = _tensors(from_folder), _tensors(from_memory)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mxfp4_folder_as_model_decodes_its_experts(export_base, tuned_model, tmp_path):
    """--model may itself be an MXFP4 folder (e.g. a previous export): its experts are decoded and compared."""
    first = export_model(export_base, model=tuned_model, out_dir=tmp_path / "first", format="mxfp4", progress=False)
    again = export_model(export_base, model=first, out_dir=tmp_path / "again", format="mxfp4", progress=False)
    a, b = _tensors(first), _tensors(again)
    assert all(torch.equal(a[k], b[k]) for k in a)  # requantizing already-quantized values is a fixed point
    report = json.loads((again / "requantize_report.json").read_text())
    assert report["summary"]["experts_changed"] == 1  # the tuned expert differs from the base, the rest do not


def test_transformers_save_bug_folder_is_refused(export_base, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = _tensors(export_base)
    tensors["model.layers.0.mlp.experts.down_proj_blocks"] = torch.zeros(2, 3)  # float values under an MXFP4 name
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((export_base / "config.json").read_text())
    with pytest.raises(CheckpointError, match="save bug"):
        export_model(export_base, model=bad, out_dir=tmp_path / "out", format="mxfp4", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force_and_failures_leave_nothing(export_base, tuned_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="--force"):
        export_model(export_base, out_dir=out, format="mxfp4", progress=False)
    assert (out / "keep.txt").read_text() == "user data"

    class Broken(torch.nn.Module):  # a tuned model whose attention has the wrong shape
        def state_dict(self):
            state = dict(tuned_model.state_dict())
            state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
            return state

    with pytest.raises(CheckpointError, match="q_proj"):
        export_model(export_base, model=Broken(), out_dir=out, format="mxfp4", force=True, progress=False)
    assert (out / "keep.txt").is_file()  # the old output survives a failed --force export
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind

    export_model(export_base, out_dir=out, format="mxfp4", force=True, progress=False)
    assert not (out / "keep.txt").exists() and validate_vllm_layout(out) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_serving_files_travel_with_every_export(export_base, tmp_path):
    for fmt in ("mxfp4", "bf16"):
        out = export_model(export_base, out_dir=tmp_path / fmt, format=fmt, progress=False)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (out / name).is_file(), (fmt, name)
        if (export_base / "chat_template.jinja").is_file():
            assert (out / "chat_template.jinja").read_bytes() == (export_base / "chat_template.jinja").read_bytes()
        assert (out / "model.safetensors").stat().st_mode & 0o044, "exports must be readable by others"


def test_sharded_export_keeps_pairs_together(export_base, tmp_path):
    out = export_model(export_base, out_dir=tmp_path / "sharded", format="mxfp4", progress=False,
                       max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert validate_vllm_layout(out) == []
    base = load_file(str(export_base / "model.safetensors")) if (export_base / "model.safetensors").is_file() else \
        _tensors(export_base)
    exported = _tensors(out)
    assert all(torch.equal(base[k], exported[k]) for k in base)
