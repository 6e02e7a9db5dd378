"""LoRA reaches every expert and every attention projection; the start-up check refuses a LoRA that misses the MoE."""

import pytest
import torch

from gptoss_train.data.collator import HarmonyDataCollator
from gptoss_train.train import model_setup
from gptoss_train.train.config import ConfigError
from gptoss_train.train.trainer import trained_token_loss


def _lora_model(cfg):
    torch.manual_seed(0)
    model = model_setup.apply_lora(model_setup.load_base_model(cfg, device="cpu"), cfg, show=False)
    model.train()
    return model


def _per_expert_slices(name, tensor, num_experts):
    """lora_A is (r*E, in) and lora_B (out, r*E) for expert parameters: one slice per expert."""
    if ".lora_A" in name:
        return list(tensor.reshape(num_experts, -1, tensor.shape[-1]))
    return list(tensor.reshape(tensor.shape[0], num_experts, -1).transpose(0, 1))


def test_every_expert_and_attention_adapter_gets_gradient_and_changes(tiny_lora_cfg, demo_rows):
    model = _lora_model(tiny_lora_cfg)
    num_experts = model.config.num_local_experts
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert any(".self_attn.q_proj" in n for n in lora) and any(".mlp.experts" in n for n in lora)
    before = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    batch = HarmonyDataCollator()(demo_rows[1][:2])
    # lora_B starts at zero, so lora_A's gradient is zero on the first step; after one step both must move.
    for step in range(2):
        loss, _ = trained_token_loss(model, batch)
        loss.backward()
        for name, param in lora.items():
            if step == 1 or ".lora_B" in name:
                assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient: {name}"
                if ".mlp.experts" in name:
                    for e, piece in enumerate(_per_expert_slices(name, param.grad, num_experts)):
                        assert piece.abs().sum() > 0, f"expert {e} of {name} got no gradient"
        optimizer.step()
        optimizer.zero_grad()
    for name, param in lora.items():
        delta = (param.detach() - before[name]).abs()
        assert delta.sum() > 0, f"unchanged: {name}"
        if ".mlp.experts" in name:
            for e, piece in enumerate(_per_expert_slices(name, delta, num_experts)):
                assert piece.sum() > 0, f"expert {e} of {name} unchanged"


def test_adaptation_table_and_moe_check(tiny_lora_cfg):
    model = _lora_model(tiny_lora_cfg)
    groups = {g.group: g for g in model_setup.describe_adaptation(model)}
    layers = list(range(model.config.num_hidden_layers))
    assert groups["attention"].layers == layers and groups["attention"].modules == 4 * len(layers)
    assert groups["experts"].layers == layers
    model_setup.check_moe_adapted(list(groups.values()), allow_no_moe=False)
    attention_only = [g for g in groups.values() if g.group == "attention"]
    with pytest.raises(ConfigError, match="adapts nothing inside the MoE"):
        model_setup.check_moe_adapted(attention_only, allow_no_moe=False)
    model_setup.check_moe_adapted(attention_only, allow_no_moe=True)


def test_config_without_moe_is_refused_at_startup(tiny_lora_cfg):
    tiny_lora_cfg.lora.experts = False
    with pytest.raises(ConfigError, match="lora.allow_no_moe"):
        _lora_model(tiny_lora_cfg)


def test_per_group_rank_and_lm_head_guard(tiny_lora_cfg):
    tiny_lora_cfg.lora.experts_r = 2
    tiny_lora_cfg.lora.experts_alpha = 4
    groups = {g.group: g for g in model_setup.describe_adaptation(_lora_model(tiny_lora_cfg))}
    assert groups["attention"].rank == 4 and groups["experts"].rank == 2
    tiny_lora_cfg.lora.extra_targets = ["lm_head"]
    with pytest.raises(ConfigError, match="modules_to_save"):
        model_setup.build_lora_config(tiny_lora_cfg.lora)


def test_lora_over_mxfp4_resident_base_trains_experts(tiny_lora_cfg, demo_rows):
    tiny_lora_cfg.model.experts = "mxfp4"
    model = _lora_model(tiny_lora_cfg)
    batch = HarmonyDataCollator()(demo_rows[1][:1])
    loss, _ = trained_token_loss(model, batch)
    loss.backward()
    expert_b = [p for n, p in model.named_parameters() if ".mlp.experts" in n and ".lora_B" in n]
    assert expert_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_b)


def test_fast_path_line_on_cpu(tiny_lora_cfg, capsys):
    line = model_setup.apply_fast_path(torch.nn.Linear(1, 1), tiny_lora_cfg)
    assert line == "reference path: transformers eager (no CUDA device)"
    tiny_lora_cfg.fast_path = "off"
    assert "fast_path: off" in model_setup.apply_fast_path(torch.nn.Linear(1, 1), tiny_lora_cfg)


@pytest.mark.parametrize("qat", [False, True])
def test_fast_path_keeps_reference_experts_under_qat(tiny_lora_cfg, monkeypatch, qat):
    """QAT patches the experts module's forward; the fast experts path would bypass it, so it is left out."""
    import gptoss_train.kernels as kernels

    seen = {}

    def fake_enable(model, **kwargs):
        seen.update(kwargs)
        return "attention=x" + (", experts=y" if kwargs.get("experts", True) else "")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "enable_fast_training", fake_enable)
    tiny_lora_cfg.qat = qat
    line = model_setup.apply_fast_path(torch.nn.Linear(1, 1), tiny_lora_cfg)
    assert seen["experts"] is (not qat)
    assert ("experts on the reference path" in line) is qat


def test_fast_section_reaches_the_fast_path(tiny_lora_cfg, monkeypatch):
    """fast.* options (typed, from YAML or the command line) are passed to enable_fast_training as they say."""
    import gptoss_train.kernels as kernels
    from gptoss_train.train.config import ConfigError, load_config

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "enable_fast_training", lambda model, **kwargs: seen.update(kwargs) or "x")
    model_setup.apply_fast_path(torch.nn.Linear(1, 1), tiny_lora_cfg)
    assert seen["lora_matmul_dtype"] is None and seen["offload_layer_inputs"] is False
    cfg = load_config(None, ["fast.lora_matmul_dtype=bfloat16", "--offload_layer_inputs", "true"])
    tiny_lora_cfg.fast = cfg.fast
    model_setup.apply_fast_path(torch.nn.Linear(1, 1), tiny_lora_cfg)
    assert seen["lora_matmul_dtype"] is torch.bfloat16 and seen["offload_layer_inputs"] is True
    assert seen["offload_embeddings"] is False
    with pytest.raises(ConfigError, match="float16"):
        load_config(None, ["fast.lora_matmul_dtype=float16"])
    with pytest.raises(ConfigError, match="did you mean 'fast.offload_layer_inputs'"):
        load_config(None, ["fast.offload_layer_input=true"])
