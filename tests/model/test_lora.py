"""LoRA targets: every expert and attention projection is adapted; both loading modes train the same adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from gptoss_train.model.lora import describe_adapted, lora_config


def _peft(model, config, seed=0):
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, copy.deepcopy(config))


def _lora_grads(model, input_ids):
    model.train()
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def test_lora_config_targets():
    config = lora_config(r=4, alpha=8, layers=[1])
    assert config.lora_dropout == 0.0 and config.r == 4 and config.lora_alpha == 8
    assert config.target_parameters == ["layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj"]
    everything = lora_config(router=True)
    assert everything.target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight"]
    with pytest.raises(ValueError, match="lora_dropout"):
        lora_config(lora_dropout=0.1)
    with pytest.raises(ValueError, match="adapts nothing"):
        lora_config(attention=False, experts=False)


def test_describe_adapted_lists_every_expert_and_projection(tiny_checkpoint):
    from gptoss_train.model.load import load_model

    model = _peft(load_model(tiny_checkpoint, experts="mxfp4"), lora_config(r=4, router=True))
    adapted = describe_adapted(model)
    groups = {}
    for target in adapted:
        groups.setdefault(target.group, set()).add((target.layer, target.parameter, target.module.rsplit(".", 1)[-1]))
    assert groups["experts"] == {(i, p, "experts") for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert groups["attention"] == {(i, "weight", p) for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert groups["router"] == {(i, "weight", "router") for i in (0, 1)}
    expert = next(t for t in adapted if t.group == "experts" and t.parameter == "gate_up_proj")
    assert expert.experts == 4 and expert.rank == 4
    assert expert.lora_parameters == 4 * 4 * 64 + 128 * 4 * 4  # A: (r·E, in=64), B: (out=128, r·E)


def test_both_modes_same_logits_and_lora_gradients(tiny_checkpoint, input_ids):
    from gptoss_train.model.load import load_model

    config = lora_config(r=4, alpha=8, init_lora_weights=False)  # random B: the adapter changes the output
    dense = _peft(load_model(tiny_checkpoint, experts="bf16"), config)
    packed = _peft(load_model(tiny_checkpoint, experts="mxfp4"), config)
    loss_d, grads_d = _lora_grads(dense, input_ids)
    loss_p, grads_p = _lora_grads(packed, input_ids)
    torch.testing.assert_close(loss_p, loss_d, rtol=0, atol=1e-6)
    assert grads_d.keys() == grads_p.keys()
    expert_grads = [n for n in grads_d if "experts" in n]
    assert len(expert_grads) == 2 * 2 * 2  # 2 layers x (gate_up, down) x (A, B)
    for name in grads_d:
        torch.testing.assert_close(grads_p[name], grads_d[name], rtol=1e-5, atol=1e-7, msg=name)
        assert grads_d[name].abs().sum() > 0, f"{name} gets no gradient"
    # the PEFT parametrization is removed after each forward (no piling up of proxies)
    import torch.nn.utils.parametrize as parametrize

    experts = packed.base_model.model.model.layers[0].mlp.experts
    while hasattr(experts, "base_layer"):
        experts = experts.base_layer
    assert not parametrize.is_parametrized(experts)


def test_mxfp4_mode_with_gradient_checkpointing(tiny_checkpoint, input_ids):
    from gptoss_train.model.load import load_model

    config = lora_config(r=4, init_lora_weights=False)
    plain = _peft(load_model(tiny_checkpoint, experts="mxfp4"), config)
    checkpointed = _peft(load_model(tiny_checkpoint, experts="mxfp4"), config)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.enable_input_require_grads()
    _, grads_plain = _lora_grads(plain, input_ids)
    _, grads_ckpt = _lora_grads(checkpointed, input_ids)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)
