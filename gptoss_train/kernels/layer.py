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
  * recomputation (recompute="layer"): our own, around two compiled functions (``RecomputedLayer``). Forward runs
    the layer body with autograd off (an inference graph: nothing saved, nothing written only for backward) and
    keeps the layer's input. Backward runs ``decoder_layer_recompute_body``, the part of the forward that backward
    needs (attention, norms, router, gate_up; not SwiGLU and the down projection, whose gradients need only their
    input, see moe._RoutedDownForGradient), and differentiates it. With the layer inputs in host memory the
    hidden state after attention travels with them, and the recompute skips the output projection's product too
    (``keeps_mid``). transformers' checkpointing would rerun the whole compiled forward, down projection and its
    MXFP4 decode included. Where our recompute does not apply (dropout, FSDP-managed layers) the compiled body runs
    under torch.utils.checkpoint, as transformers' would.

One compiled function serves every layer: modules are passed as arguments, so dynamo guards on their structure,
not their identity. Layers differ only in window (sliding / full) and in whether their experts carry LoRA, so a run
compiles at most four variants. Decoding with a KV cache, and the per-module recompute choices ("attention",
"experts", which install their own checkpoint inside the layer), take transformers' eager layer forward.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from gptoss_train.kernels.attention import layer_block_mask
from gptoss_train.kernels.lora import linear_for_gradient, linear_for_gradient_supported
from gptoss_train.kernels.moe import _fast_mlp_forward
from gptoss_train.kernels.norm import rms_norm


def decoder_layer_body(layer, hidden_states, position_embeddings, attention_mask, position_ids, block_mask,
                       with_mid: bool = False):
    """transformers' GptOssDecoderLayer.forward (no cache) with our norms and experts; the compiled region.
    ``with_mid``: also return the hidden state after attention, (output, mid), for a recompute that starts from it."""
    norm = layer.input_layernorm
    residual = hidden_states
    hidden = rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    hidden, _ = layer.self_attn(hidden_states=hidden, position_embeddings=position_embeddings,
                                attention_mask=attention_mask, position_ids=position_ids, block_mask=block_mask)
    hidden = residual + hidden
    norm = layer.post_attention_layernorm
    residual = hidden
    hidden, _ = _fast_mlp_forward(layer.mlp, rms_norm(hidden, norm.weight, norm.variance_epsilon))
    return (residual + hidden, residual) if with_mid else residual + hidden


def attention_before_output_projection(attention, hidden_states, position_embeddings, attention_mask, **kwargs):
    """transformers' GptOssAttention.forward without a cache, up to (not including) ``o_proj``: its input.
    (tests/kernels/test_layer.py checks it against the installed transformers' forward.)"""
    from transformers.models.gpt_oss.modeling_gpt_oss import (ALL_ATTENTION_FUNCTIONS, apply_rotary_pos_emb,
                                                              eager_attention_forward)

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, attention.head_dim)
    query = attention.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = attention.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = attention.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    out, _ = interface(attention, query, key, value, attention_mask,
                       dropout=0.0 if not attention.training else attention.attention_dropout,
                       scaling=attention.scaling, sliding_window=attention.sliding_window, s_aux=attention.sinks,
                       **kwargs)
    return out.reshape(*input_shape, -1).contiguous()


class _KnownSum(torch.autograd.Function):
    """``known`` as the value of ``a + b`` (computed in an earlier pass), with the sum's gradients to a and b."""

    @staticmethod
    def forward(ctx, known, a, b):
        return known.view_as(known)

    @staticmethod
    def backward(ctx, grad):
        return None, grad, grad


def decoder_layer_recompute_body(layer, hidden_states, mid, position_embeddings, attention_mask, position_ids,
                                 block_mask):
    """What a layer's backward needs of its forward, for our recompute: (hidden after attention, experts stub).

    The layer's output is ``h + experts(norm2(h))``; backward feeds the output gradient to both. The experts stub
    has the experts' gradients but no values (``moe_experts_forward(gradient_only=True)``). ``mid``: h as the
    forward computed it (kept by RecomputedLayer); the output projection then runs for its gradients only
    (lora.linear_for_gradient): its product and LoRA forward are skipped, and h takes mid's values."""
    norm = layer.input_layernorm
    hidden = rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    if mid is None:
        hidden, _ = layer.self_attn(hidden_states=hidden, position_embeddings=position_embeddings,
                                    attention_mask=attention_mask, position_ids=position_ids, block_mask=block_mask)
        hidden = hidden_states + hidden
    else:
        attended = attention_before_output_projection(layer.self_attn, hidden, position_embeddings, attention_mask,
                                                      position_ids=position_ids, block_mask=block_mask)
        hidden = _KnownSum.apply(mid, hidden_states, linear_for_gradient(layer.self_attn.o_proj, attended))
    norm = layer.post_attention_layernorm
    experts, _ = _fast_mlp_forward(layer.mlp, rms_norm(hidden, norm.weight, norm.variance_epsilon),
                                   gradient_only=True)
    return hidden, experts


def keeps_mid(layer) -> bool:
    """Whether RecomputedLayer keeps this layer's hidden state after attention from forward to backward (then the
    recompute skips the output projection's product): with the layer inputs in host memory (it travels with
    them, 47 MiB a layer at 4 x 2048 tokens of 20b), and an output projection that linear_for_gradient covers."""
    return "_host_inputs" in layer.__dict__ and linear_for_gradient_supported(layer.self_attn.o_proj)


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    return [(device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            for device in ("cuda", "cpu")]


class RecomputedLayer(torch.autograd.Function):
    """A decoder layer whose forward saves only its input; backward recomputes what it needs and differentiates.

    ``run_forward(hidden)`` is the layer body (run here with autograd off), returning the output or (output, mid);
    ``run_recompute(hidden, mid)`` returns ``(h, experts)`` as ``decoder_layer_recompute_body`` does. The layer's
    trainable parameters are inputs, so their gradients come back through this Function (autograd's own
    accumulation, hooks included), not as a side effect. Dropout would need the RNG replayed: layers with active
    dropout use checkpointing instead (``own_recompute_ok``). ``offload_input`` (None, or ``LayerInputsInHost.offload``
    bound to this layer's index): keep the saved input (and mid) in pinned host memory until backward.
    """

    @staticmethod
    def forward(ctx, run_forward, run_recompute, offload_input, hidden, *params):
        ctx.run_recompute = run_recompute
        ctx.autocast = _autocast_state()
        ctx.host_input = offload_input(hidden) if offload_input is not None else None
        with torch.no_grad():
            result = run_forward(hidden)
        out, mid = result if isinstance(result, tuple) else (result, None)
        ctx.has_mid = mid is not None
        kept = []
        if ctx.host_input is None:
            kept = [hidden] + ([mid] if mid is not None else [])
        elif mid is not None:
            ctx.host_input.add(mid)
        ctx.num_kept = len(kept)
        ctx.save_for_backward(*kept, *params)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        if ctx.host_input is not None:
            kept, params = ctx.host_input.fetch(), saved
            ctx.host_input = None
        else:
            kept, params = saved[:ctx.num_kept], saved[ctx.num_kept:]
        hidden = kept[0].detach().requires_grad_(ctx.needs_input_grad[3])
        mid = kept[1] if ctx.has_mid else None
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for device, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            after_attention, experts = ctx.run_recompute(hidden, mid)
        wanted = [(index, tensor) for index, tensor in enumerate([hidden, *params]) if ctx.needs_input_grad[3 + index]]
        grads = torch.autograd.grad((after_attention, experts), [tensor for _, tensor in wanted], (grad, grad),
                                    allow_unused=True)
        out = [None] * (1 + len(params))
        for (index, _), value in zip(wanted, grads):
            out[index] = value
        return (None, None, None, *out)


class _HostInput:
    """A layer's saved tensors (its input, then possibly its hidden state after attention) in pinned host memory:
    copied out on a side stream during forward, copied back for the recompute; fetching them starts the copy of the
    previous layer's (``inputs[index - 1]``), whose backward comes next."""

    def __init__(self, tensor: torch.Tensor, stream: torch.cuda.Stream, inputs: dict, index: int):
        self.stream, self.device, self.ready = stream, tensor.device, None
        self.inputs, self.index, self.on_device, self.hosts = inputs, index, None, []
        self.add(tensor)

    def add(self, tensor: torch.Tensor) -> None:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is complete
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.hosts.append(host)

    def prefetch(self) -> None:
        if self.on_device is not None or self.hosts is None:
            return
        main = torch.cuda.current_stream(self.device)
        # allocated in the main stream's pool; the copy waits for the work already queued there, so the blocks are
        # free in both streams' order
        self.on_device = [torch.empty(host.shape, dtype=host.dtype, device=self.device) for host in self.hosts]
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for tensor, host in zip(self.on_device, self.hosts):
                tensor.copy_(host, non_blocking=True)
            self.ready = self.stream.record_event()

    def fetch(self) -> list[torch.Tensor]:
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        tensors, self.on_device, self.hosts = self.on_device, None, None  # the pinned blocks go back to torch's cache
        self.inputs.pop(self.index, None)
        previous = self.inputs.get(self.index - 1)
        if previous is not None:
            previous.prefetch()
        return tensors


class LayerInputsInHost:
    """The saved layer inputs of one model in pinned host memory (opt-in, ``offload_layer_inputs``).

    With our recompute, a layer's input is all its forward keeps: 47 MiB per layer at 4 x 2048 tokens of 20b, 1.1 GiB
    for the 24 layers, alive from forward to backward. They move to host memory on a side stream as forward produces
    them and come back one layer ahead of backward (while layer i recomputes, layer i-1's input is copied in), so the
    copies overlap compute; the last layer's input stays on the GPU (backward needs it first). The hidden state
    after attention goes along (``keeps_mid``): twice the traffic, 2.2 GiB each way a step at 4 x 2048, which the
    link carries in ~40 ms of a ~400 ms step, against a skipped GEMM per layer."""

    def __init__(self, num_layers: int):
        self.num_layers, self.inputs, self.stream = num_layers, {}, None

    def install(self, layers) -> None:
        for layer in layers:
            layer._host_inputs = self

    def offload(self, hidden: torch.Tensor, index: int | None) -> _HostInput | None:
        if not hidden.is_cuda or index is None or index == self.num_layers - 1:
            return None
        if self.stream is None:
            self.stream = torch.cuda.Stream(hidden.device)
        if index == 0:  # a new forward
            self.inputs = {}
        self.inputs[index] = _HostInput(hidden, self.stream, self.inputs, index)
        return self.inputs[index]


def own_recompute_ok(layer) -> bool:
    """Whether RecomputedLayer may stand in for checkpointing on this layer: no active dropout (its RNG would have
    to be replayed) and not managed by FSDP (whose hooks reshard parameters between forward and backward)."""
    if any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in layer.modules()):
        return False
    if "FSDP" in type(layer).__name__ or hasattr(layer, "_get_fsdp_state"):
        return False
    return not any(type(p).__name__ == "DTensor" for p in layer.parameters())


@functools.cache
def _compiled_body(backend: str):
    import torch._dynamo.config as dynamo_config

    # sliding/full x experts with/without LoRA x grad/no-grad, per sequence length: well under 64, but more than the
    # default 8 once a run trains several lengths (past the limit dynamo silently runs uncompiled).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(decoder_layer_body, backend=backend, dynamic=False)


@functools.cache
def _compiled_recompute_body(backend: str):
    _compiled_body(backend)  # same dynamo settings
    return torch.compile(decoder_layer_recompute_body, backend=backend, dynamic=False)


def _run(kind: str, backend: str | None, layer, *args, **kwargs):
    """One of the bodies, compiled with ``backend`` (None: eagerly). A compiler failure raises TorchDynamoException
    before anything has run (see _compiled_layer_forward)."""
    if backend is None:
        return (decoder_layer_body if kind == "forward" else decoder_layer_recompute_body)(layer, *args, **kwargs)
    return (_compiled_body if kind == "forward" else _compiled_recompute_body)(backend)(layer, *args, **kwargs)


# dtype -> why its compilation failed; such layers run eagerly from then on (a failure in one dtype, say a float32
# check, leaves the others compiled).
_compile_failed: dict[torch.dtype, str] = {}


def _uses_per_module_recompute(layer) -> bool:
    # install_recompute("attention" | "experts") put a checkpointing forward on the sub-module: keep eager then.
    return any("_forward_before_recompute" in module.__dict__ for module in (layer.self_attn, layer.mlp))


def _record_compile_failure(dtype: torch.dtype, err: Exception, what: str) -> None:
    import traceback

    reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    _compile_failed[dtype] = reason
    warnings.warn(f"compiled decoder layer failed in {dtype} ({reason}); {what}\n{traceback.format_exc()[-3000:]}")


def _fell_back(layer, dtype: torch.dtype, kind: str) -> bool:
    """Whether this layer runs the ``kind`` body eagerly: compilation failed in ``dtype`` before this layer ran that
    graph compiled. A layer that did keeps it (a checkpoint's recompute must save what its forward saved)."""
    return dtype in _compile_failed and kind not in layer.__dict__.get("_compiled_ran", {}).get(dtype, ())


def _ran_compiled(layer, dtype: torch.dtype, kind: str) -> None:
    layer.__dict__.setdefault("_compiled_ran", {}).setdefault(dtype, set()).add(kind)


def _recompute(backend: str | None, layer, args, hidden, mid):
    from torch._dynamo.exc import TorchDynamoException

    if backend is not None and not _fell_back(layer, hidden.dtype, "recompute"):
        try:
            out = _run("recompute", backend, layer, hidden, mid, *args)
            _ran_compiled(layer, hidden.dtype, "recompute")
            return out
        except TorchDynamoException as err:
            # Recomputing eagerly gives values that may differ from the compiled forward's in the last bits (another
            # fusion), which only moves the point where the gradient is taken by that much.
            _record_compile_failure(hidden.dtype, err, "recomputing the layers eagerly")
    return _run("recompute", None, layer, hidden, mid, *args)


def _layer_call(layer, backend: str | None, mode: str, hidden_states, args):
    """The layer body with ``mode`` "own" (RecomputedLayer), "checkpoint" (torch.utils.checkpoint around the body)
    or "none"; ``backend`` None runs the bodies eagerly."""
    if mode == "own":
        params = [p for p in layer.parameters() if p.requires_grad]
        host_inputs = layer.__dict__.get("_host_inputs")
        offload = (functools.partial(host_inputs.offload, index=getattr(layer.self_attn, "layer_idx", None))
                   if host_inputs is not None else None)
        return RecomputedLayer.apply(functools.partial(_forward_body, backend, layer, args, keeps_mid(layer)),
                                     functools.partial(_recompute, backend, layer, args), offload, hidden_states,
                                     *params)
    if mode == "checkpoint":
        return torch.utils.checkpoint.checkpoint(_run, "forward", backend, layer, hidden_states, *args,
                                                 use_reentrant=False)
    return _run("forward", backend, layer, hidden_states, *args)


def _forward_body(backend, layer, args, with_mid, hidden):
    return _run("forward", backend, layer, hidden, *args, with_mid=with_mid)


def _compiled_layer_forward(layer, eager_forward, backend, hidden_states, attention_mask=None, position_ids=None,
                            past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    """Replacement for GptOssDecoderLayer.forward (same arguments, same result) that runs the compiled body."""
    if past_key_values is not None or _uses_per_module_recompute(layer):
        return eager_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, use_cache=use_cache,
                             position_embeddings=position_embeddings, **kwargs)
    dtype = hidden_states.dtype
    mode = "none"
    if layer.__dict__.get("_own_recompute") and torch.is_grad_enabled() and layer.training:
        mode = "own" if own_recompute_ok(layer) else "checkpoint"
    graph_mask, graph_positions, block_mask = attention_mask, position_ids, None
    if hidden_states.is_cuda:  # FlexAttention's mask, built eagerly; the graph then needs neither mask input
        batch_size, seq_len = hidden_states.shape[:2]
        caller = layer.__dict__.get("_caller_positions")
        mask_positions = position_ids if caller is None or caller.given else None  # None: one document per row
        block_mask = layer_block_mask(attention_mask, mask_positions, layer.self_attn.sliding_window, batch_size,
                                      seq_len, hidden_states.device)
        graph_mask = graph_positions = None
    args = (position_embeddings, graph_mask, graph_positions, block_mask)
    if _fell_back(layer, dtype, "forward"):
        return _layer_call(layer, None, mode, hidden_states, args)
    from torch._dynamo.exc import TorchDynamoException

    try:
        out = _layer_call(layer, backend, mode, hidden_states, args)
    except TorchDynamoException as err:  # a compiler failure must not stop training: run the layer eagerly
        # Only tracing/compilation errors land here: they are raised before the graph runs, so nothing of this call
        # has executed. Errors while the compiled code runs (and checkpointing's own control-flow exceptions)
        # propagate unchanged.
        _record_compile_failure(dtype, err, "running the layers eagerly")
        return _layer_call(layer, None, mode, hidden_states, args)
    _ran_compiled(layer, dtype, "forward")
    return out


def compile_failure() -> str | None:
    """Why the compiled layers fell back to eager in this process (None while they work)."""
    if not _compile_failed:
        return None
    return "; ".join(f"{str(dtype).removeprefix('torch.')}: {reason}" for dtype, reason in _compile_failed.items())


def decoder_layers(model) -> list:
    """The GptOssDecoderLayer modules of ``model`` (PEFT-wrapped or not), in order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [module for module in base.modules() if type(module).__name__ == "GptOssDecoderLayer"]


class CallerPositions:
    """Whether the running forward's ``position_ids`` came from its caller (a forward pre-hook on the GptOssModel
    records it). transformers fills in 0..L-1 when none are given: one document per row. The layers then build
    their attention mask without positions, so it is the same mask every step and is built once; given positions
    (packed documents) are a new tensor each batch and carry the document lookup."""

    def __init__(self):
        self.given = True  # until a forward says otherwise: keep the positions (always correct)

    def record(self, module, args, kwargs) -> None:
        positions = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
        self.given = positions is not None


def _decoder_stack(model):
    """The GptOssModel holding the decoder layers (None if there is none)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return next((module for module in base.modules() if type(module).__name__ == "GptOssModel"), None)


def install_compiled_layers(model, backend: str = "inductor") -> int:
    """Run every GptOssDecoderLayer of ``model`` through the compiled body; returns how many were switched.

    Needs the fast attention and experts installed (``enable_fast_training`` does it in that order)."""
    layers = decoder_layers(model)
    stack = _decoder_stack(model)
    caller = None
    if stack is not None:
        caller = stack.__dict__.get("_caller_positions")
        if caller is None:
            caller = stack._caller_positions = CallerPositions()
            stack._caller_positions_hook = stack.register_forward_pre_hook(caller.record, with_kwargs=True)
    for module in layers:
        eager = module.__dict__.get("_forward_before_compile") or module.forward
        module._forward_before_compile = eager
        module.forward = functools.partial(_compiled_layer_forward, module, eager, backend)
        if caller is not None:
            module._caller_positions = caller
    return len(layers)


def remove_compiled_layers(model) -> int:
    """Undo ``install_compiled_layers`` (transformers' eager layer forward again); returns how many were restored."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stack = _decoder_stack(model)
    if stack is not None and "_caller_positions_hook" in stack.__dict__:
        stack.__dict__.pop("_caller_positions_hook").remove()
        stack.__dict__.pop("_caller_positions", None)
    restored = 0
    for module in base.modules():
        module.__dict__.pop("_caller_positions", None)
        eager = module.__dict__.pop("_forward_before_compile", None)
        if eager is not None:
            module.forward = eager
            restored += 1
    return restored
