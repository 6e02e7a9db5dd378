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
