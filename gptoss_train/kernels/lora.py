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
            module._lora_matmul_dtype = dtype
            module.forward = functools.partial(_lora_linear_forward, module, original, dtype)
            switched += 1
    return switched


# ---------------------------------------------------------------------------------- gradient-only output projection
class _LinearForGradient(torch.autograd.Function):
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ with frozen W, b: gradients only, no output (see ``linear_for_gradient``).

    With g = dL/dy:  dx = g W + s (g B) A,   dB = s gᵀ (x Aᵀ),   dA = s (g B)ᵀ x,
    the LoRA products in ``compute_dtype`` (PEFT's: the adapter's dtype, float32; or ``install_lora_matmul_dtype``'s),
    the base product in the activations' dtype, as the module's own forward computes them."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling: float, compute_dtype: torch.dtype):
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling, ctx.compute_dtype = scaling, compute_dtype
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        grad_x = grad @ weight.to(grad.dtype)
        grad_a = grad_b = None
        if lora_a is not None:
            dtype, scaling = ctx.compute_dtype, ctx.scaling
            rows_g, rows_x = grad.reshape(-1, grad.shape[-1]).to(dtype), x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            grad_low = rows_g @ b  # [N, r]
            grad_x = grad_x + (scaling * (grad_low @ a)).view(grad_x.shape).to(grad_x.dtype)
            grad_b = (scaling * (rows_g.t() @ (rows_x @ a.t()))).to(lora_b.dtype)  # [out, r]
            grad_a = (scaling * (grad_low.t() @ rows_x)).to(lora_a.dtype)  # [r, in]
        return grad_x, None, grad_a, grad_b, None, None


def _single_plain_adapter(module):
    """(lora_A, lora_B, scaling) of a PEFT lora.Linear's one active adapter, or None where PEFT's forward does more
    than a plain LoRA product (several adapters, DoRA & co., dropout, a lora_B bias, merged or disabled)."""
    if module.disable_adapters or module.merged or getattr(module, "fan_in_fan_out", False):
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None
    name = active[0]
    dropout = module.lora_dropout[name]
    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
        return None
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if getattr(lora_b, "bias", None) is not None:
        return None
    return lora_a.weight, lora_b.weight, module.scaling[name]


def linear_for_gradient_supported(module) -> bool:
    """Whether ``linear_for_gradient`` can stand in for ``module``: an nn.Linear, or PEFT's lora.Linear around one
    with a single plain adapter, whose base weight and bias are frozen."""
    base = getattr(module, "base_layer", module)
    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return False
    if base.bias is not None and base.bias.requires_grad:
        return False
    return base is module or _single_plain_adapter(module) is not None


def linear_for_gradient(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``'s gradients without its output: an uninitialised tensor of the output's shape whose backward
    gives dL/dx and the adapter's gradients exactly (``linear_for_gradient_supported`` must hold).

    For a layer's recompute whose output projection's result is known already (kernels/layer.py keeps the layer's
    hidden state after attention from the forward): the product and the LoRA forward are skipped."""
    base = getattr(module, "base_layer", module)
    lora = None if base is module else _single_plain_adapter(module)
    lora_a, lora_b, scaling = lora if lora is not None else (None, None, 0.0)
    compute_dtype = module.__dict__.get("_lora_matmul_dtype")
    if compute_dtype is None and lora_a is not None:  # PEFT's forward: the input cast to the adapter's dtype
        compute_dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                         else lora_a.dtype)
    return _LinearForGradient.apply(x, base.weight, lora_a, lora_b, float(scaling), compute_dtype or x.dtype)
