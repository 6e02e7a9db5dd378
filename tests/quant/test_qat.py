"""QAT fake-quant: forward equals the requantized model's, gradients pass straight through, works under PEFT LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

from gptoss_train.quant import mxfp4
from gptoss_train.quant.qat import disable_qat, enable_qat, qat_enabled

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 256, 3]])


@pytest.fixture()
def small_model():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    # The experts and QAT do not care about the vocabulary: a small one keeps this test fast.
    config = GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                          vocab_size=512, sliding_window=8)
    model = GptOssForCausalLM(config).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:  # off-grid, realistic-sized expert weights
            layer.mlp.experts.gate_up_proj.normal_(0, 0.3)
            layer.mlp.experts.down_proj.normal_(0, 0.3)
    return model


def _quantize_experts_(model, rule="best", scales_of=None):
    """Experts replaced by decode(encode(W)), keeping the scales of ``scales_of``'s experts (as enable_qat does)."""
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                weight = getattr(layer.mlp.experts, proj)
                source = getattr((scales_of or model).model.layers[index].mlp.experts, proj)
                keep = mxfp4.encode(source.transpose(-1, -2), rule=rule)[1]
                blocks, scales = mxfp4.encode(weight.transpose(-1, -2), rule=rule, keep_scales=keep)
                weight.copy_(mxfp4.decode(blocks, scales, dtype=torch.float32, transpose=True))
    return model


def test_forward_equals_quantized_model_and_gradient_is_straight_through(small_model):
    reference = _quantize_experts_(copy.deepcopy(small_model))
    assert enable_qat(small_model) == 2 and qat_enabled(small_model)
    out = small_model(IDS).logits
    ref = reference(IDS).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    out.square().mean().backward()
    ref.square().mean().backward()
    for ours, theirs in zip(small_model.model.layers, reference.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            grad, ref_grad = getattr(ours.mlp.experts, proj).grad, getattr(theirs.mlp.experts, proj).grad
            assert grad is not None and grad.abs().sum() > 0
            torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)  # dL/dW = dL/dQ(W)
    # the parameters themselves are untouched and unwrapped after the forward
    assert isinstance(small_model.model.layers[0].mlp.experts.gate_up_proj, torch.nn.Parameter)


def test_disable_restores_plain_forward(small_model):
    plain = small_model(IDS).logits.detach()
    enable_qat(small_model)
    assert not torch.equal(small_model(IDS).logits.detach(), plain)
    assert disable_qat(small_model) == 2 and not qat_enabled(small_model)
    assert torch.equal(small_model(IDS).logits.detach(), plain)


def test_lora_on_experts_quantizes_base_plus_delta(small_model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    base = copy.deepcopy(small_model)
    peft_model = get_peft_model(small_model, config)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    merged = _quantize_experts_(copy.deepcopy(peft_model).merge_and_unload(), scales_of=base)
    enable_qat(peft_model)
    out = peft_model(IDS).logits
    torch.testing.assert_close(out, merged(IDS).logits, rtol=0, atol=1e-5)
    out.square().mean().backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    # PEFT's own parametrization is gone after the forward, ours too
    from torch.nn.utils import parametrize

    from gptoss_train.quant.qat import expert_modules

    assert all(not parametrize.is_parametrized(module) for _, module in expert_modules(peft_model))
    disable_qat(peft_model)


def test_scales_from_checkpoint_mirror_requantize(small_model, tmp_path):
    """With the base's scales, QAT's forward uses exactly the weights requantize_experts will write."""
    from safetensors.torch import save_file

    from gptoss_train.quant.requantize import requantize_experts

    base_tensors = {}
    for index, layer in enumerate(small_model.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            blocks, scales = mxfp4.encode(getattr(layer.mlp.experts, proj).detach().transpose(-1, -2), rule="noclip")
            base_tensors[f"model.layers.{index}.mlp.experts.{proj}_blocks"] = blocks
            base_tensors[f"model.layers.{index}.mlp.experts.{proj}_scales"] = scales
    save_file(base_tensors, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        for layer in small_model.model.layers:
            layer.mlp.experts.down_proj.mul_(1.03)
    enable_qat(small_model, scales_from=tmp_path)
    experts = small_model.model.layers[1].mlp.experts
    fake_quant = experts._gptoss_qat["fake_quants"]["down_proj"]
    seen = fake_quant(experts.down_proj.detach())
    blocks, scales, _ = requantize_experts(
        "down", base_tensors["model.layers.1.mlp.experts.down_proj_blocks"],
        base_tensors["model.layers.1.mlp.experts.down_proj_scales"], experts.down_proj.detach().transpose(-1, -2))
    assert torch.equal(seen, mxfp4.decode(blocks, scales, dtype=torch.float32, transpose=True))


def test_mxfp4_resident_experts_match_dense(tiny_checkpoint):
    """QAT on MXFP4-resident experts (load_model(experts="mxfp4")) equals QAT on the dense load with the same LoRA."""
    pytest.importorskip("gptoss_train.model.load")
    from peft import get_peft_model

    from gptoss_train.model.load import load_model
    from gptoss_train.model.lora import lora_config

    models = []
    for experts in ("bf16", "mxfp4"):
        model = get_peft_model(load_model(tiny_checkpoint, experts=experts, dtype=torch.float32),
                               lora_config(r=2, attention=False, experts=True))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "lora_" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
        enable_qat(model, scales_from=tiny_checkpoint)
        models.append(model)
    ids = torch.tensor([[200006, 1000, 2000, 200008, 33]])
    dense, resident = (m(ids).logits for m in models)
    torch.testing.assert_close(resident, dense, rtol=0, atol=1e-5)
    assert disable_qat(models[1]) == 2 and not qat_enabled(models[1])


def test_qat_experiment_script_smoke(tmp_path, monkeypatch):
    """scripts/qat_experiment.py runs end to end (a few steps) and writes its table; the real run is in docs/qat.md."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "qat_experiment.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--seeds", "0", "--steps-a", "3", "--steps-b", "2",
                                      "--qat-after-steps", "1", "--out", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    table = (tmp_path / "table.md").read_text()
    for row in ("released base", "bf16 experts", "requantized MXFP4", "LoRA + QAT", "then QAT +1 steps"):
        assert row in table
    result = json.loads((tmp_path / "results.json").read_text())["results"][0]
    # QAT trained against exactly what requantization ships
    assert result["qat_forward_task_b"] == result["qat_requantized"]["task_b"]
