"""One gpt-oss decoder layer as one compiled region (``torch.compile``), for training on CUDA.

Why: with attention, experts, norms and loss already fast, the profile of a 20b step (docs/fast-training.md) was
dominated by small eager kernels around them: PEFT's LoRA on q/k/v/o (cast, A, B, scale, add, each separately, in
forward, in the recompute and in backward), rotary, dtype casts, residual adds, the sink fold; and by the CPU time
spent launching them. Compiling the layer body fuses those elementwise passes and cuts the launches.

What is compiled is transformers' own computation, re-stated in one function over the layer's own modules:
    residual + attn(norm1(x)),  then  residual + experts(norm2(h))
with transformers' ``GptOssAttention.forward`` (so PEFT's ``lora.Linear`` modules and the registered attention
function run as they are), our RMSNorm math (kernels/norm.py), and our routed experts (kernels/moe.py). PEFT's
``lora_A``/``lora_B`` stay the trained parameters.

Kept outside the graph, deliberately:
  * the FlexAttention BlockMask: built eagerly once per batch and window (a cache keyed on tensor identity cannot
    be traced) and passed in as an input, as FlexAttention's own examples do;
  * recomputation: transformers' checkpointing wraps the compiled call (recompute="layer" reruns the compiled
    forward in backward), so the graph's saved activations are a layer's, held only for that layer's backward.

One compiled function serves every layer: modules are passed as arguments, so dynamo guards on their structure,
not their identity. Layers differ only in window (sliding / full) and in whether their experts carry LoRA, so a run
compiles at most four variants. Decoding with a KV cache, and the per-module recompute choices ("attention",
"experts", which install their own checkpoint inside the layer), take transformers' eager layer forward.
"""

from __future__ import annotations

import functools
import warnings

import torch

from gptoss_train.kernels.attention import layer_block_mask
from gptoss_train.kernels.moe import _fast_mlp_forward
from gptoss_train.kernels.norm import rms_norm


def decoder_layer_body(layer, hidden_states, position_embeddings, attention_mask, position_ids, block_mask):
    """transformers' GptOssDecoderLayer.forward (no cache) with our norms and experts; the compiled region."""
    norm = layer.input_layernorm
    residual = hidden_states
    hidden = rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    hidden, _ = layer.self_attn(hidden_states=hidden, position_embeddings=position_embeddings,
                                attention_mask=attention_mask, position_ids=position_ids, block_mask=block_mask)
    hidden = residual + hidden
    norm = layer.post_attention_layernorm
    residual = hidden
    hidden, _ = _fast_mlp_forward(layer.mlp, rms_norm(hidden, norm.weight, norm.variance_epsilon))
    return residual + hidden


@functools.cache
def _compiled_body(backend: str):
    import torch._dynamo.config as dynamo_config

    # sliding/full x experts with/without LoRA x grad/no-grad, per sequence length: well under 64, but more than the
    # default 8 once a run trains several lengths (past the limit dynamo silently runs uncompiled).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(decoder_layer_body, backend=backend, dynamic=False)


# dtype -> why its compilation failed; such layers run eagerly from then on (a failure in one dtype, say a float32
# check, leaves the others compiled).
_compile_failed: dict[torch.dtype, str] = {}


def _uses_per_module_recompute(layer) -> bool:
    # install_recompute("attention" | "experts") put a checkpointing forward on the sub-module: keep eager then.
    return any("_forward_before_recompute" in module.__dict__ for module in (layer.self_attn, layer.mlp))


def _compiled_layer_forward(layer, eager_forward, backend, hidden_states, attention_mask=None, position_ids=None,
                            past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    """Replacement for GptOssDecoderLayer.forward (same arguments, same result) that runs the compiled body."""
    dtype = hidden_states.dtype
    # A layer that ran compiled in this dtype keeps doing so even after another layer's compilation failed: its
    # recompute must save exactly what its forward saved (checkpointing compares them).
    fell_back = dtype in _compile_failed and dtype not in layer.__dict__.get("_compiled_ran", ())
    if past_key_values is not None or fell_back or _uses_per_module_recompute(layer):
        return eager_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, use_cache=use_cache,
                             position_embeddings=position_embeddings, **kwargs)
    graph_mask, graph_positions, block_mask = attention_mask, position_ids, None
    if hidden_states.is_cuda:  # FlexAttention's mask, built eagerly; the graph then needs neither mask input
        batch_size, seq_len = hidden_states.shape[:2]
        block_mask = layer_block_mask(attention_mask, position_ids, layer.self_attn.sliding_window, batch_size,
                                      seq_len, hidden_states.device)
        graph_mask = graph_positions = None
    from torch._dynamo.exc import TorchDynamoException

    try:
        out = _compiled_body(backend)(layer, hidden_states, position_embeddings, graph_mask, graph_positions,
                                      block_mask)
    except TorchDynamoException as err:  # a compiler failure must not stop training: run the layer eagerly
        # Only tracing/compilation errors land here: they are raised before the graph runs, so nothing of this call
        # has executed. Errors while the compiled code runs (and checkpointing's own control-flow exceptions)
        # propagate unchanged.
        import traceback

        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        _compile_failed[hidden_states.dtype] = reason
        warnings.warn(f"compiled decoder layer failed in {hidden_states.dtype} ({reason}); running the layers "
                      f"eagerly\n"
                      f"{traceback.format_exc()[-3000:]}")
        return eager_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, use_cache=use_cache,
                             position_embeddings=position_embeddings, **kwargs)
    layer.__dict__.setdefault("_compiled_ran", set()).add(dtype)
    return out


def compile_failure() -> str | None:
    """Why the compiled layers fell back to eager in this process (None while they work)."""
    if not _compile_failed:
        return None
    return "; ".join(f"{str(dtype).removeprefix('torch.')}: {reason}" for dtype, reason in _compile_failed.items())


def install_compiled_layers(model, backend: str = "inductor") -> int:
    """Run every GptOssDecoderLayer of ``model`` through the compiled body; returns how many were switched.

    Needs the fast attention and experts installed (``enable_fast_training`` does it in that order)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    switched = 0
    for module in base.modules():
        if type(module).__name__ != "GptOssDecoderLayer":
            continue
        eager = module.__dict__.get("_forward_before_compile") or module.forward
        module._forward_before_compile = eager
        module.forward = functools.partial(_compiled_layer_forward, module, eager, backend)
        switched += 1
    return switched


def remove_compiled_layers(model) -> int:
    """Undo ``install_compiled_layers`` (transformers' eager layer forward again); returns how many were restored."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    restored = 0
    for module in base.modules():
        eager = module.__dict__.pop("_forward_before_compile", None)
        if eager is not None:
            module.forward = eager
            restored += 1
    return restored
