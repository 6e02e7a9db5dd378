"""PEFT LoRA linear layers computed in the activations' dtype (opt-in, ``enable_fast_training(lora_matmul_dtype=)``).

PEFT keeps adapters in float32 (``autocast_adapter_dtype``) and computes ``lora_B(lora_A(x))`` in float32: x is cast up,
both products run as fp32 SIMT GEMMs (no tensor cores with TF32 off) and the rank-r update is an fp32 [tokens, out]
buffer. On the 20b step that was 23-41 ms of the attention's q/k/v/o adapters (docs/fast-training.md, profiles). Here
the factors are cast to the activations' dtype (bf16) for the products, as autocast would do, and the float32
parameters stay the ones trained: their gradients come back through the cast in float32. The result differs from
PEFT's by bf16 rounding of the rank-r intermediate and of the update, which is why it is an option, not the default.
"""

from __future__ import annotations

import functools

import torch


def _lora_linear_forward(module, original_forward, dtype, x, *args, **kwargs):
    active = [name for name in module.active_adapters if name in module.lora_A]
    if (args or kwargs or module.disable_adapters or module.merged
            or any(name in module.lora_variant for name in active)):  # DoRA & co., mixed batches: PEFT's own forward
        return original_forward(x, *args, **kwargs)
    result = module.base_layer(x)
    result_dtype = result.dtype
    for name in active:
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        low = torch.nn.functional.linear(module.lora_dropout[name](x.to(dtype)), lora_a.weight.to(dtype))
        bias = None if lora_b.bias is None else lora_b.bias.to(dtype)
        result = result + torch.nn.functional.linear(low, lora_b.weight.to(dtype), bias) * module.scaling[name]
    return result.to(result_dtype)


def install_lora_matmul_dtype(model, dtype: torch.dtype) -> int:
    """Compute every PEFT ``lora.Linear`` of ``model`` in ``dtype``; returns how many were switched (again: re-set)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    switched = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            original = module.__dict__.get("_forward_before_lora_dtype") or module.forward
            module._forward_before_lora_dtype = original
            module.forward = functools.partial(_lora_linear_forward, module, original, dtype)
            switched += 1
    return switched
