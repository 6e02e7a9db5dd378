"""Export from a PEFT adapter (LoRA on attention + experts): merged, requantized, untouched experts byte-identical."""

from __future__ import annotations

import pytest
import torch

from gptoss_train.export import export_model, validate_vllm_layout
from gptoss_train.export.safetensors_io import SafetensorsFolder

UNTOUCHED = (0, 2)  # experts whose LoRA B-slice stays zero: their delta is exactly 0


@pytest.fixture(scope="module")
def adapter_dir(export_base, tmp_path_factory):
    pytest.importorskip("gptoss_train.model.lora")
    from peft import get_peft_model

    from gptoss_train.model.load import load_model
    from gptoss_train.model.lora import lora_config

    model = load_model(export_base, experts="bf16", dtype=torch.float32)
    config = model.config
    peft_model = get_peft_model(model, lora_config(r=4, alpha=8, attention=True, experts=True))
    r, experts = 4, config.num_local_experts
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" not in name:
                continue
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            if param.shape[-1] == r * experts and "self_attn" not in name:
                # expert LoRA: B is [out, r*E] read by PEFT as [out, r, E], so expert e owns columns e, e+E, ...
                for e in UNTOUCHED:
                    param[:, e::experts] = 0
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(str(out))
    return out


def test_adapter_export_matches_merged_model(export_base, adapter_dir, tmp_path, load_f32):
    from gptoss_train.model.merge import merge_adapter

    out = export_model(export_base, adapter=adapter_dir, out_dir=tmp_path / "mx", format="mxfp4", progress=False)
    assert validate_vllm_layout(out) == []
    base, exported = SafetensorsFolder(export_base), SafetensorsFolder(out)
    for layer in range(2):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{proj}_blocks"
            b, x = base.get(name), exported.get(name)
            for e in UNTOUCHED:
                assert torch.equal(b[e], x[e]), (name, e)
            assert not torch.equal(b[1], x[1]) and not torch.equal(b[3], x[3])
    # the same as exporting the merged model held in memory
    merged = merge_adapter(str(export_base), str(adapter_dir), dtype=torch.float32)
    again = export_model(export_base, model=merged, out_dir=tmp_path / "mx2", format="mxfp4", progress=False)
    other = SafetensorsFolder(again)
    assert all(torch.equal(exported.get(n), other.get(n)) for n in exported.keys())
    ids = torch.tensor([[200006, 17360, 200008, 12194, 11, 1495, 553, 481, 30, 200007, 200006, 173781]])
    with torch.no_grad():
        ours = merged(ids).logits[0]
        theirs = load_f32(out)(ids).logits[0]
    assert float((ours - theirs).abs().mean()) < 0.05 * float(ours.abs().mean())
