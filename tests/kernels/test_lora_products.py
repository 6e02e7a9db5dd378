"""PEFT linear LoRA computed in another dtype (kernels/lora.py) against PEFT's own float32 forward."""

import copy

import torch

from gptoss_train.kernels import enable_fast_training

from conftest import add_lora, build_tiny_model, lora_grads, rel_err


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def test_lora_products_in_the_adapters_dtype_are_peft_exactly():
    model = build_tiny_model()
    reference, fast = add_lora(copy.deepcopy(model), experts=False), add_lora(copy.deepcopy(model), experts=False)
    description = enable_fast_training(fast, force=True, attention=False, experts=False, loss=False,
                                       lora_matmul_dtype=torch.float32)
    assert "linear LoRA in float32 x8" in description  # q/k/v/o of 2 layers
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(21))
    ref_loss, ref_grads = _step(reference, ids)
    loss, grads = _step(fast, ids)
    assert rel_err(loss, ref_loss) < 1e-6
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name


def test_lora_products_in_bf16_train_float32_adapters_close_to_peft():
    """bf16 products, float32 parameters and gradients; within bf16 rounding of PEFT's float32 result."""
    model = build_tiny_model().to(torch.bfloat16)
    reference = add_lora(copy.deepcopy(model), experts=False)
    fast = add_lora(copy.deepcopy(model), experts=False)
    for peft_model in (reference, fast):  # PEFT keeps adapters in float32 on a bf16 base (autocast_adapter_dtype)
        assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)
    enable_fast_training(fast, force=True, attention=False, experts=False, loss=False,
                         lora_matmul_dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(22))
    ref_loss, ref_grads = _step(reference, ids)
    loss, grads = _step(fast, ids)
    assert rel_err(loss, ref_loss) < 1e-2
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert grad.abs().sum() > 0, name
        assert rel_err(grad, ref_grads[name]) < 5e-2, name


def _o_proj_grads(module, x, grad_out, stub: bool):
    from gptoss_train.kernels.lora import linear_for_gradient

    x = x.clone().requires_grad_()
    out = linear_for_gradient(module, x) if stub else module(x)
    trainable = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(out, [x, *trainable], grad_out)


def test_output_projection_for_gradient_has_the_modules_gradients():
    """linear_for_gradient (a recompute's o_proj whose output is known) gives the input and adapter gradients of
    the module's own forward: plain frozen Linear, PEFT LoRA (float32 adapters, PEFT's forward), LoRA with bf16
    products (install_lora_matmul_dtype)."""
    from gptoss_train.kernels import install_lora_matmul_dtype
    from gptoss_train.kernels.lora import linear_for_gradient_supported

    generator = torch.Generator().manual_seed(5)
    model = build_tiny_model()
    plain = copy.deepcopy(model).model.layers[0].self_attn.o_proj.requires_grad_(False)
    peft_model = add_lora(copy.deepcopy(model), experts=False)
    lora = peft_model.get_base_model().model.layers[0].self_attn.o_proj
    bf16_model = add_lora(copy.deepcopy(model), experts=False).to(torch.bfloat16)
    install_lora_matmul_dtype(bf16_model, torch.bfloat16)
    lora_bf16 = bf16_model.get_base_model().model.layers[0].self_attn.o_proj
    x = torch.randn(2, 5, plain.in_features, generator=generator)
    grad_out = torch.randn(2, 5, plain.out_features, generator=generator)
    for module, dtype, tol in ((plain, torch.float32, 1e-6), (lora, torch.float32, 1e-6),
                               (lora_bf16, torch.bfloat16, 1e-2)):
        assert linear_for_gradient_supported(module)
        full = _o_proj_grads(module, x.to(dtype), grad_out.to(dtype), stub=False)
        only = _o_proj_grads(module, x.to(dtype), grad_out.to(dtype), stub=True)
        assert len(full) == len(only) == (1 if module is plain else 3)
        for got, expected in zip(only, full):
            assert got.dtype == expected.dtype and expected.abs().sum() > 0
            assert rel_err(got, expected) < tol


def test_output_projection_for_gradient_refuses_what_it_does_not_compute():
    from peft import LoraConfig, get_peft_model

    from gptoss_train.kernels.lora import linear_for_gradient_supported

    model = build_tiny_model()
    assert not linear_for_gradient_supported(model.model.layers[0].self_attn.o_proj)  # trainable weight (full FT)
    dropout = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["o_proj"], lora_dropout=0.1))
    assert not linear_for_gradient_supported(dropout.get_base_model().model.layers[0].self_attn.o_proj)
    dora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["o_proj"], use_dora=True))
    assert not linear_for_gradient_supported(dora.get_base_model().model.layers[0].self_attn.o_proj)
    plain = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["o_proj"]))
    o_proj = plain.get_base_model().model.layers[0].self_attn.o_proj
    assert linear_for_gradient_supported(o_proj)
    plain.base_model.disable_adapter_layers()
    assert not linear_for_gradient_supported(o_proj)
