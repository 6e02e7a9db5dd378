"""Fast training (and generation) paths for gpt-oss that plug into transformers' model definition.

Training pieces (each usable alone; ``enable_fast_training`` switches them all on, on CUDA):
  * ``attention``  FlexAttention with the sinks folded in through the log-sum-exp; causal / 128-window / packed.
  * ``moe``        experts + PEFT LoRA as grouped GEMMs over routed tokens; frozen experts may stay MXFP4.
  * ``loss``       chunked linear + cross-entropy over the 201k vocabulary (no full logits).
  * ``layer``      each decoder layer's body as one compiled region (fuses PEFT's attention LoRA, rotary, casts,
                   residuals around the pieces above; cuts kernel launches).
  * recomputation  which activations to recompute in backward (``recompute=``), chosen by measurement
                   (scripts/bench_train.py; docs/fast-training.md); "layer" over compiled layers is our own
                   (layer.RecomputedLayer: the recompute pass skips the down projection).
  * opt-in         ``embedding``: the frozen input table in host memory; ``lora``: PEFT's linear LoRA products in
                   bf16 instead of fp32.
"""

from __future__ import annotations

import functools

import torch

from gptoss_train.kernels.attention import install_sink_attention, register_sink_attention, sink_attention_forward
from gptoss_train.kernels.loss import causal_lm_chunked_loss, chunked_linear_cross_entropy, install_chunked_loss
from gptoss_train.kernels.embedding import offload_frozen_embeddings, restore_embeddings
from gptoss_train.kernels.layer import compile_failure, decoder_layers, install_compiled_layers
from gptoss_train.kernels.lora import install_lora_matmul_dtype
from gptoss_train.kernels.moe import attach_mxfp4_experts, install_fast_experts, moe_experts_forward
from gptoss_train.kernels.norm import install_compiled_norms

__all__ = [
    "enable_fast_training", "install_sink_attention", "register_sink_attention", "sink_attention_forward",
    "install_fast_experts", "moe_experts_forward", "attach_mxfp4_experts", "install_chunked_loss",
    "chunked_linear_cross_entropy", "causal_lm_chunked_loss", "install_recompute", "RECOMPUTE_CHOICES",
    "install_compiled_norms", "install_compiled_layers", "compile_failure", "offload_frozen_embeddings",
    "restore_embeddings", "install_lora_matmul_dtype", "install_layer_inputs_in_host",
]

# "layer": recompute whole decoder layers (least memory): with compiled layers our own recompute, which skips what
#          backward does not need (kernels/layer.py, RecomputedLayer); otherwise transformers' gradient checkpointing.
# "experts": recompute only the MoE block (its activations are ~10x attention's per token); keep attention's.
# "attention": recompute only attention. "none": keep everything (most memory, no recompute).
RECOMPUTE_CHOICES = ("layer", "experts", "attention", "none")


def _checkpointed_forward(original, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)
    return original(*args, **kwargs)


def _disable_checkpointing(base) -> None:
    renamed = hasattr(type(base), "is_activation_checkpointing")
    if base.is_activation_checkpointing if renamed else base.is_gradient_checkpointing:
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()


def install_recompute(model, recompute: str, *, own: bool = True) -> None:
    """Set what backward recomputes; see RECOMPUTE_CHOICES. ``own=False`` makes "layer" use transformers'
    checkpointing even over compiled layers (the A/B of scripts/bench_train.py)."""
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"recompute={recompute!r}: choose one of {', '.join(RECOMPUTE_CHOICES)}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # A KV cache would grow again during recomputation (transformers' own checkpointing turns it off too).
    base.config.use_cache = False
    layers = decoder_layers(base)
    compiled = bool(layers) and all("_forward_before_compile" in layer.__dict__ for layer in layers)
    use_own = recompute == "layer" and own and compiled
    for layer in layers:
        layer._own_recompute = use_own
    if recompute == "layer" and not use_own:
        # transformers >= 5.2x renamed it activation_checkpointing_enable; 5.17 (GPU image) has the old name only
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
        return
    _disable_checkpointing(base)
    target = {"experts": "GptOssMLP", "attention": "GptOssAttention"}.get(recompute)
    for module in base.modules():
        # undo an earlier choice first, so calling this again switches instead of stacking checkpoints
        original = module.__dict__.pop("_forward_before_recompute", None)
        if original is not None:
            module.forward = original
        if target and type(module).__name__ == target:
            module._forward_before_recompute = module.forward
            module.forward = functools.partial(_checkpointed_forward, module.forward)


def install_layer_inputs_in_host(model) -> bool:
    """Keep the layer inputs saved by our recompute in pinned host memory (see layer.LayerInputsInHost); False
    where our recompute is not in use (nothing installed)."""
    from gptoss_train.kernels.layer import LayerInputsInHost

    layers = decoder_layers(model)
    if not layers or not all(layer.__dict__.get("_own_recompute") for layer in layers):
        return False
    LayerInputsInHost(len(layers)).install(layers)
    return True


def enable_fast_training(model, *, attention: bool = True, experts: bool = True, loss: bool = True, norms: bool = True,
                         recompute: str | None = None, loss_chunk_size: int = 1024, compile_layers: bool | None = None,
                         compile_backend: str = "inductor", offload_embeddings: bool = False,
                         lora_matmul_dtype: torch.dtype | None = None, offload_layer_inputs: bool = False,
                         force: bool = False) -> str | None:
    """Switch a loaded GptOssForCausalLM (possibly PEFT-wrapped) to the fast training path.

    Returns a one-line description of what was switched, or None when the model is not on CUDA (the reference
    transformers path stays in place; ``force=True`` installs the CPU reference implementations anyway, for tests).
    Call it after PEFT has wrapped the model (the experts path reads PEFT's LoRA factors) and before training.
    ``compile_layers`` (default: on CUDA, when attention and experts are on) runs each decoder layer as one
    compiled region (kernels/layer.py); recompute "attention"/"experts" keep those layers eager.
    ``offload_embeddings`` (opt-in) keeps a frozen input embedding table in pinned host memory (kernels/embedding.py;
    read its docstring before combining it with generation in the same process).
    ``lora_matmul_dtype`` (opt-in, e.g. torch.bfloat16) computes PEFT's linear LoRA products in that dtype instead of
    the adapters' float32 (kernels/lora.py); the float32 adapters stay the trained parameters.
    ``offload_layer_inputs`` (opt-in, CUDA, with recompute="layer" over compiled layers) keeps the layer inputs that
    our recompute saves in pinned host memory between forward and backward (layer.LayerInputsInHost).
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return None
    if device.type != "cuda" and not force:
        return None
    parts = []
    if attention:
        parts.append(f"attention={install_sink_attention(model)}")
    if experts:
        parts.append(f"experts=grouped_mm+LoRA over {install_fast_experts(model)} layers")
    if norms and device.type == "cuda":
        parts.append(f"norms=compiled x{install_compiled_norms(model)}")
    if loss:
        install_chunked_loss(model, chunk_size=loss_chunk_size)
        parts.append(f"loss=chunked linear-CE (chunk {loss_chunk_size})")
    if compile_layers is None:
        compile_layers = device.type == "cuda" and attention and experts
    if compile_layers:
        if not (attention and experts):
            raise ValueError("compile_layers needs attention=True and experts=True (the compiled body uses both)")
        parts.append(f"layers=compiled ({compile_backend}) x{install_compiled_layers(model, compile_backend)}")
        # A training forward with use_cache would build a KV cache, and layers given a cache run eagerly (decoding);
        # generate() still asks for its cache explicitly.
        (model.get_base_model() if hasattr(model, "get_base_model") else model).config.use_cache = False
    if lora_matmul_dtype is not None:
        switched = install_lora_matmul_dtype(model, lora_matmul_dtype)
        parts.append(f"linear LoRA in {str(lora_matmul_dtype).removeprefix('torch.')} x{switched}")
    if offload_embeddings:
        freed = offload_frozen_embeddings(model)
        parts.append(f"embeddings=host memory ({freed / 2**30:.2f} GiB freed)" if freed
                     else "embeddings=kept (trained or tied)")
    if recompute is not None:
        install_recompute(model, recompute)
        parts.append(f"recompute={recompute}")
    if offload_layer_inputs:
        parts.append(f"layer inputs={'host memory' if install_layer_inputs_in_host(model) else 'kept (needs our recompute)'}")
    return "fast training path: " + ", ".join(parts)
