"""gpt-oss MoE experts with LoRA as grouped GEMMs over the routed tokens.

Why not transformers' path: with PEFT ``target_parameters`` the experts' LoRA is applied by re-parametrising the whole
[E, in, out] weight (W + B·A) on every forward, so each step builds full-size expert stacks, and the frozen base must be
a resident bf16 copy. Here the routed (token, expert) pairs are sorted by expert once per layer and every product is
one ``torch._grouped_mm`` call over all experts:

    y = x·W_e + b_e + s · (x·A_eᵀ)·B_eᵀ          (per routed pair, e = its expert)

with the LoRA factors read straight from PEFT's ``lora_A``/``lora_B`` (trained in place, so the adapter PEFT saves is
the one we train). No per-expert Python loop and no host synchronisation (group offsets stay on the device).

Frozen weights can stay MXFP4: an experts module holding ``{gate_up,down}_proj_{blocks,scales}`` (HF layout, see
``attach_mxfp4_experts``) is decoded per layer into a transient bf16 buffer inside forward and decoded again in backward
(only dX is needed for a frozen weight), so no bf16 copy of the experts ever stays resident.
"""

from __future__ import annotations

import functools
import math

import torch

from gptoss_train.kernels import mxfp4_decode, swiglu

# E2M1 code -> value (formats.md §2.2); value = LUT[code] * 2^(scale_byte - 127).
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# ------------------------------------------------------------------------------------------------ MXFP4 storage
def _decode_mxfp4_eager(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, out, G, 16] uint8 + [E, out, G] uint8 -> [E, out, G*32] ``dtype`` (even element = low nibble)."""
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=blocks.device)
    low = lut[(blocks & 0x0F).long()]
    high = lut[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [E, out, G, 32]
    values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
    return values.flatten(-2).to(dtype)


@functools.cache
def _decode_mxfp4_compiled():
    # One fused elementwise kernel instead of ~8 passes over a 1 GB buffer (the decode runs 2-3 times per layer
    # per step, so its memory traffic matters).
    return torch.compile(_decode_mxfp4_eager, dynamic=False)


_compiled_decode_failed = False


def decode_mxfp4_experts(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16,
                         rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode a stack of expert matrices [E, out, G, 16] for the hot path (numerically identical to
    ``quant.mxfp4.decode``); ``rows=(start, stop)``: only those output rows of every expert."""
    global _compiled_decode_failed
    if blocks.is_cuda and mxfp4_decode.triton_available() and dtype in (torch.bfloat16, torch.float16, torch.float32):
        return mxfp4_decode.decode_mxfp4_triton(blocks, scales, dtype, rows)
    if rows is not None:
        blocks, scales = blocks[:, rows[0]:rows[1]], scales[:, rows[0]:rows[1]]
    if blocks.is_cuda and not _compiled_decode_failed:
        try:
            return _decode_mxfp4_compiled()(blocks, scales, dtype)
        except Exception as err:  # noqa: BLE001 - a compiler failure must not stop training: decode unfused
            _compiled_decode_failed = True
            import warnings
            warnings.warn(f"compiled MXFP4 decode failed ({type(err).__name__}: {err}); using the unfused decode")
    return _decode_mxfp4_eager(blocks, scales, dtype)


def attach_mxfp4_experts(experts: torch.nn.Module, gate_up_blocks, gate_up_scales, down_blocks, down_scales) -> None:
    """Make ``experts`` (a GptOssExperts) read its frozen matrices from MXFP4 bytes (HF layout, formats.md).

    The bytes become buffers named like the checkpoint tensors. ``gate_up_proj`` / ``down_proj`` are replaced by
    zero-stride placeholders of the right shape, dtype and device (2 bytes each) so PEFT's ``target_parameters`` can
    still size and place its adapters; only this module's fast forward reads the real weights.
    """
    num_experts, gate_up_out, groups, _ = gate_up_blocks.shape
    hidden = groups * 32
    dtype = experts.gate_up_proj.dtype if experts.gate_up_proj.is_floating_point() else torch.bfloat16
    for name, tensor in (("gate_up_proj_blocks", gate_up_blocks), ("gate_up_proj_scales", gate_up_scales),
                         ("down_proj_blocks", down_blocks), ("down_proj_scales", down_scales)):
        experts.register_buffer(name, tensor, persistent=True)
    device = gate_up_blocks.device
    placeholder = lambda *shape: torch.nn.Parameter(  # noqa: E731
        torch.zeros(1, dtype=dtype, device=device).expand(*shape), requires_grad=False)
    experts.gate_up_proj = placeholder(num_experts, hidden, gate_up_out)
    experts.down_proj = placeholder(num_experts, down_blocks.shape[2] * 32, down_blocks.shape[1])
    experts.mxfp4_resident = True


def has_mxfp4_experts(experts: torch.nn.Module) -> bool:
    return getattr(experts, "gate_up_proj_blocks", None) is not None and getattr(experts, "down_proj_blocks", None) is not None


# ------------------------------------------------------------------------------------------ grouped products
def _gemm_layout(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm takes row- or column-major operands only; a permuted view (PEFT's lora_B read as [E, r, out])
    # must be copied. Eagerly a .contiguous() at the call site does it, but inductor treats that as a layout hint
    # it may drop (seen on the H100: "Invalid strides/sizes ... [1, 32, 256]"), so the copy happens in here.
    if t.is_contiguous() or t.transpose(-1, -2).is_contiguous():
        return t
    return t.contiguous()


@torch.library.custom_op("gptoss_train::grouped_mm_any_layout", mutates_args=())
def _grouped_mm_opaque(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(_gemm_layout(a), _gemm_layout(b), offs=offs).contiguous()


@_grouped_mm_opaque.register_fake
def _(a, b, offs):
    if b.dim() == 3:  # [M, K] x [G, K, N] -> [M, N]
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # [K, M] x [M, N], groups along M -> [G, K, N]


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, native: bool = False) -> torch.Tensor:
    """torch._grouped_mm, traceable in any dtype and operand layout.

    By default the call goes through an opaque custom op with its own shape function, which fixes operand layouts
    itself (see ``_gemm_layout``) and which traces in float32 too: the eager op computes float32 (CPU tests, the GPU
    float32 check), but its meta function accepts bf16 only. ``native=True`` (bf16 only) keeps the op inductor knows,
    for operands whose layout is fixed by construction (the decoded MXFP4 stacks)."""
    if native and a.dtype == torch.bfloat16:
        return torch._grouped_mm(a, b, offs=offs)
    return _grouped_mm_opaque(a, b, offs)


class _GroupedMM(torch.autograd.Function):
    """y[rows of group e] = x[rows of group e] @ w[e]; gradients for x and (if trainable) w."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return _grouped_mm(x, w, offs)

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _grouped_mm(grad, w.transpose(-1, -2), offs) if ctx.needs_input_grad[0] else None
        # 2-D x 2-D with offsets along the shared dimension gives one [in, out] product per group (zero if empty).
        grad_w = _grouped_mm(x.t(), grad, offs) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


# Largest transient bf16 piece of a decoded expert stack. A whole 20b gate_up stack is 1 GiB (120b: 4 GiB) and it is
# alive in the backward of every layer, next to that layer's recomputed activations, where the step's memory peaks:
# decoding (and multiplying) a range of output rows at a time bounds it. Smaller pieces cost more, narrower GEMMs:
# on the H100 (20b, 4 x 2048) 256 MiB gave 15,642 tok/s at 16.54 GiB, 512 MiB 16,261 at 16.71 (docs/benchmarks.md).
DECODE_PIECE_BYTES = 512 * 2**20
# The same bound for products run with autograd off (the forward of a recomputed layer, kernels/layer.py): nothing is
# saved there, so the step's peak is elsewhere and a whole 20b stack fits; fewer, wider GEMMs and no concatenation.
NO_GRAD_DECODE_PIECE_BYTES = 1024 * 2**20
# A layer's recompute pass (kernels/layer.py) is followed at once by its backward, which decodes gate_up again for dX:
# the recompute decodes the stack whole and keeps it for that dX instead (one decode, two GEMMs without pieces) when
# the bf16 stack is at most this big. On the H100 (20b gate_up, 1 GiB), per layer: recompute product 2.35 -> 2.00 ms,
# dX 2.77 -> 1.49 ms; the step's peak grows by about the stack (docs/benchmarks.md). 120b's 4 GiB stacks keep pieces.
KEEP_DECODED_MAX_BYTES = 1280 * 2**20


def _row_pieces(blocks: torch.Tensor, dtype: torch.dtype, budget: int | None = None) -> list[tuple[int, int]]:
    experts, rows, groups = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    row_bytes = experts * groups * 32 * torch.empty((), dtype=dtype).element_size()
    budget = DECODE_PIECE_BYTES if budget is None else budget
    per_piece = max(8, budget // row_bytes // 8 * 8)  # multiples of 8 rows keep 16-byte alignment
    pieces = math.ceil(rows / per_piece)
    size = rows if pieces == 1 else math.ceil(math.ceil(rows / pieces) / 8) * 8  # equal pieces, 8-row multiples
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


class _GroupedMMFromMXFP4(torch.autograd.Function):
    """y = x @ decode(W)ᵀ per group, for a frozen MXFP4 stack [E, out, in]; backward gives dX only.

    Default: the stack is decoded a range of output rows at a time (``DECODE_PIECE_BYTES``): forward concatenates the
    pieces' output columns, backward decodes again and sums their contributions to dX. No bf16 copy outlives the
    product that reads it. ``keep_decoded`` (the recompute pass of a layer, whose backward follows at once): the
    stack is decoded whole, once, and kept for backward's dX (see ``KEEP_DECODED_MAX_BYTES``)."""

    @staticmethod
    def forward(ctx, x, blocks, scales, offs, budget: int, keep_decoded: bool = False):
        ctx.kept = keep_decoded
        if keep_decoded:
            weight = decode_mxfp4_experts(blocks, scales, x.dtype)  # [E, out, in]
            ctx.save_for_backward(weight, offs)
            return _grouped_mm(x, weight.transpose(-1, -2), offs, native=True)
        ctx.save_for_backward(blocks, scales, offs)
        outputs = []
        for rows in _row_pieces(blocks, x.dtype, budget):
            weight = decode_mxfp4_experts(blocks, scales, x.dtype, rows)  # [E, rows, in], transient
            outputs.append(_grouped_mm(x, weight.transpose(-1, -2), offs, native=True))
            del weight
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    @staticmethod
    def backward(ctx, grad):
        if ctx.kept:
            weight, offs = ctx.saved_tensors
            # Through the opaque op: its input keeps the row-major layout it is produced in (inductor may otherwise
            # pick another layout for the SwiGLU-backward kernel that writes it, seen as that kernel taking twice
            # as long on the H100).
            return _grouped_mm(grad, weight, offs), None, None, None, None, None
        blocks, scales, offs = ctx.saved_tensors
        return _mxfp4_grad_input(grad, blocks, scales, offs), None, None, None, None, None


def _mxfp4_grad_input(grad: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grad @ decode(W) per group ([P, out] -> [P, in]) for a frozen MXFP4 stack [E, out, in], decoded in row pieces
    whose contributions are summed."""
    grad = grad.contiguous()
    grad_x = None
    for start, stop in _row_pieces(blocks, grad.dtype):
        weight = decode_mxfp4_experts(blocks, scales, grad.dtype, (start, stop))
        piece = grad if (start, stop) == (0, grad.shape[1]) else grad[:, start:stop].contiguous()
        part = _grouped_mm(piece, weight, offs, native=True)
        del weight
        grad_x = part if grad_x is None else grad_x.add_(part)
    return grad_x


class _GatherRows(torch.autograd.Function):
    """rows = source[index] where ``index`` visits every source row exactly ``repeats`` times (a routing permutation).

    autograd's own backward of an index is a sort-based scatter-add (3.7 ms per call at 20b shapes, a quarter of a
    step in the first profile); knowing the pattern, the backward is a gather by the inverse permutation plus a sum."""

    @staticmethod
    def forward(ctx, source, index, inverse, repeats: int):
        ctx.save_for_backward(inverse)
        ctx.repeats = repeats
        return source[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad_source = grad[inverse]
        if ctx.repeats > 1:
            grad_source = grad_source.view(-1, ctx.repeats, grad.shape[-1]).sum(dim=1)
        return grad_source, None, None, None


def _frozen_or_trainable_matmul(x, base, name: str, offs, keep_decoded: bool = False):
    """x @ W_e for the base weight ``name`` (gate_up_proj / down_proj) of a GptOssExperts, whatever its storage.

    ``keep_decoded``: an MXFP4 stack small enough (``KEEP_DECODED_MAX_BYTES``) is decoded once for the product and
    its backward."""
    if has_mxfp4_experts(base):
        blocks, scales = getattr(base, f"{name}_blocks"), getattr(base, f"{name}_scales")
        budget = DECODE_PIECE_BYTES if torch.is_grad_enabled() else NO_GRAD_DECODE_PIECE_BYTES
        decoded_bytes = blocks.shape[0] * blocks.shape[1] * blocks.shape[2] * 32 * x.element_size()
        keep = keep_decoded and torch.is_grad_enabled() and decoded_bytes <= KEEP_DECODED_MAX_BYTES
        return _GroupedMMFromMXFP4.apply(x, blocks, scales, offs, budget, keep)
    weight = getattr(base, name)  # [E, in, out] (transformers' is_transposed layout)
    return _GroupedMM.apply(x, weight.to(x.dtype), offs)


# ----------------------------------------------------------------------------------------------- PEFT adapters
def _unwrap_experts(module) -> tuple[torch.nn.Module, dict[str, list[tuple]]]:
    """Peel PEFT ParamWrappers off an experts module: (base GptOssExperts, {param name: [(A, B, scaling), ...]}).

    A is [E, in, r] and B [E, r, out] views of PEFT's lora_A [r·E, in] (rows expert-major) and lora_B [out, r·E]
    (columns rank-major), matching ``ParamWrapper.get_delta_weight``."""
    adapters: dict[str, list[tuple]] = {}
    while hasattr(module, "base_layer") and hasattr(module, "parameter_name") and hasattr(module, "lora_A"):
        wrapper, module = module, module.base_layer
        if wrapper.disable_adapters or wrapper.merged:
            continue
        if getattr(wrapper, "_did_swap_in_out_features", False):
            raise NotImplementedError("experts stored as [E, out, in] are not supported by the grouped LoRA path")
        for name in wrapper.active_adapters:
            if name not in wrapper.lora_A:
                continue
            experts = wrapper.num_experts
            weight_a = wrapper.lora_A[name].weight
            weight_b = wrapper.lora_B[name].weight
            rank = weight_a.shape[0] // experts
            lora_a = weight_a.view(experts, rank, -1).transpose(1, 2)  # [E, in, r]
            lora_b = weight_b.view(weight_b.shape[0], rank, experts).permute(2, 1, 0)  # [E, r, out]
            adapters.setdefault(wrapper.parameter_name, []).append((lora_a, lora_b, wrapper.scaling[name]))
    return module, adapters


def _lora_operands(lora_a: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype):
    """A [E, in, r] and B [E, r, out] as grouped-GEMM operands: ``dtype``, contiguous, and the rank zero-padded to a
    multiple of 16 bytes (grouped_mm needs 16-byte-aligned strides: r=4 in bf16 would be refused). The zero rank
    columns/rows add nothing to the product, and autograd slices their gradients off; the copies are r-wide."""
    lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
    align = max(1, 16 // lora_a.element_size())
    pad = -lora_a.shape[-1] % align
    if pad:
        lora_a = torch.nn.functional.pad(lora_a, (0, pad))
        lora_b = torch.nn.functional.pad(lora_b, (0, 0, 0, pad))
    return lora_a.contiguous(), lora_b.contiguous()


def _projection(x, base, name, adapters, offs, keep_decoded: bool = False):
    out = _frozen_or_trainable_matmul(x, base, name, offs, keep_decoded)
    for lora_a, lora_b, scaling in adapters.get(name, ()):
        lora_a, lora_b = _lora_operands(lora_a, lora_b, x.dtype)
        low = _GroupedMM.apply(x, lora_a, offs)
        out = out + scaling * _GroupedMM.apply(low, lora_b, offs)
    return out


class _RoutedDownForGradient(torch.autograd.Function):
    """SwiGLU and the routed down projection of a layer's recompute pass: gradients only, no output.

    out[t] = sum_k w_tk * (act_p @ W_e + b_e + s * (act_p A_e) B_e),   act_p = SwiGLU(u_p + c_e)
    (p = routed pair (t, k), e = its expert, u_p its gate_up product, c_e the gate_up bias)

    A layer's recompute (kernels/layer.py, ``decoder_layer_recompute_body``) runs forward only so that backward has
    the activations; the layer's output is never read there. Of the down projection, backward needs ``act`` and the
    routing weights, not the product itself: with g the output gradient of pair p and G = g @ W_eᵀ (+ LoRA), which
    backward computes anyway,

        d act_p = w_p * G_p,     d w_p = <G_p, act_p> + <g_p, b_e>,

    so this Function's forward returns an uninitialised [T, H] tensor: the grouped GEMM, its MXFP4 decode, the bias,
    routing weight and un-permute of the recompute pass are skipped (a sixth of the expert GEMMs and decodes of a
    step), and so is SwiGLU itself: backward gets ``act`` from u inside one kernel that also gives d u and d w
    (kernels/swiglu.py; inductor's version of those passes took 4x the bytes' time on the H100). Frozen base weights
    and biases only (LoRA on them is fine); the caller keeps the full path otherwise."""

    @staticmethod
    def forward(ctx, gate_up, weights, lora_a, lora_b, frozen, scales, bias, gate_up_bias, pair_tokens,
                sorted_experts, offs, scaling: float, num_tokens: int, alpha: float, limit: float):
        ctx.save_for_backward(gate_up, weights, lora_a, lora_b, frozen, scales, bias, gate_up_bias, pair_tokens,
                              sorted_experts, offs)
        ctx.scaling, ctx.mxfp4, ctx.alpha, ctx.limit = scaling, scales is not None, alpha, limit
        return gate_up.new_empty(num_tokens, bias.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (gate_up, weights, lora_a, lora_b, frozen, scales, bias, gate_up_bias, pair_tokens, sorted_experts,
         offs) = ctx.saved_tensors
        grad = grad_out[pair_tokens]  # [P, H], expert-sorted like gate_up
        if ctx.mxfp4:
            grad_act_unweighted = _mxfp4_grad_input(grad, frozen, scales, offs)
        else:  # frozen dense [E, in, out]
            grad_act_unweighted = _grouped_mm(grad, frozen.transpose(-1, -2), offs)
        if lora_a is not None:
            grad_low = _grouped_mm(grad, lora_b.transpose(-1, -2), offs)  # [P, r]
            grad_act_unweighted = grad_act_unweighted + ctx.scaling * _grouped_mm(grad_low, lora_a.transpose(-1, -2),
                                                                                  offs)
        grad_gate_up, grad_weights = swiglu.swiglu_routed_backward(gate_up, gate_up_bias, sorted_experts,
                                                                    grad_act_unweighted, weights, ctx.alpha, ctx.limit)
        # <g_p, b_e> of every pair from one [T, E] product (each token's gradient against every expert's bias), in
        # the activations' dtype: a float32 product here was a 64 us SIMT GEMM a layer on the H100
        bias_dots = grad_out @ bias.to(grad_out.dtype).t()
        grad_weights = (grad_weights + bias_dots[pair_tokens, sorted_experts].float()).to(weights.dtype)
        grad_lora_a = grad_lora_b = None
        if lora_a is not None:
            act = swiglu.bias_swiglu(gate_up, gate_up_bias, sorted_experts, ctx.alpha, ctx.limit)
            weight_col = weights.unsqueeze(-1).to(act.dtype)
            low = _grouped_mm(act, lora_a, offs)  # [P, r]
            grad_lora_b = ctx.scaling * _grouped_mm(low.t(), grad * weight_col, offs)  # [E, r, H]
            grad_lora_a = ctx.scaling * _grouped_mm(act.t(), grad_low * weight_col, offs)  # [E, I, r]
        return (grad_gate_up, grad_weights, grad_lora_a, grad_lora_b) + (None,) * 11


def _bias_route(down: torch.Tensor, bias: torch.Tensor, sorted_experts: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    # (down + b_e) * routing weight, fused on CUDA.
    return (down + bias[sorted_experts].to(down.dtype)) * weights.unsqueeze(-1).to(down.dtype)


def _combine(down: torch.Tensor, inverse: torch.Tensor, bias: torch.Tensor, router_indices: torch.Tensor,
             routing_weights: torch.Tensor) -> torch.Tensor:
    # out[t] = sum_k w_tk * (down[pair (t, k)] + b_e): un-permute, bias, routing weight and the sum over K read the
    # expert-sorted products once (on the H100 the two kernels of the autograd-friendly version, bias_route then
    # _GatherRows and the sum, took 0.24 ms a layer).
    num_tokens, top_k = router_indices.shape
    rows = down[inverse].view(num_tokens, top_k, -1)
    return ((rows + bias[router_indices].to(down.dtype)) * routing_weights.unsqueeze(-1).to(down.dtype)).sum(dim=1)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=None)


def _down_for_gradient_supported(base, adapters) -> bool:
    """Whether _RoutedDownForGradient can stand in for SwiGLU and the down projection: frozen down weight, frozen
    biases, at most one active adapter on the down projection."""
    weight = base.down_proj
    if ((weight.requires_grad and not has_mxfp4_experts(base)) or base.down_proj_bias.requires_grad
            or base.gate_up_proj_bias.requires_grad):
        return False
    return len(adapters.get("down_proj", ())) <= 1


def route_order(flat_experts: torch.Tensor, num_experts: int):
    """Group the routed pairs by expert: (order, inverse, offs), with ``order`` the stable sort of ``flat_experts``
    (pair indices, expert-major), ``inverse[i]`` where pair i sits in that order, ``offs`` the groups' end offsets.

    A counting sort: a pair's place is its expert's start plus the number of earlier pairs routed to the same expert
    (a running count per expert). With 32 or 128 experts that is a few fused elementwise/scan kernels, where a sort
    is a multi-kernel radix sort whose launches (and temporary allocations) kept the CPU busy: in the compiled
    layer's forward, which the CPU launches barely faster than the GPU runs it, the GPU waited on them."""
    experts = torch.arange(num_experts, device=flat_experts.device, dtype=flat_experts.dtype)
    one_hot = (flat_experts[:, None] == experts[None, :]).to(torch.int32)  # [P, E]
    running = torch.cumsum(one_hot, dim=0, dtype=torch.int32)  # [P, E]: pairs so far per expert
    counts = running[-1]
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    rank = running.gather(1, flat_experts[:, None].to(torch.int64)).squeeze(1) - 1  # earlier pairs, same expert
    inverse = ((offs - counts)[flat_experts] + rank).to(torch.int64)
    order = torch.empty_like(inverse)
    order[inverse] = torch.arange(inverse.numel(), device=inverse.device)
    return order, inverse, offs


def moe_experts_forward(hidden: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor,
                        experts_module: torch.nn.Module, *, gradient_only: bool = False) -> torch.Tensor:
    """Routed experts (+ LoRA) for T tokens: hidden [T, H], router_indices / routing_weights [T, K] -> [T, H].

    ``experts_module`` is a GptOssExperts (bf16 or MXFP4-attached) or the PEFT ParamWrapper chain around one.
    ``gradient_only``: for a recompute pass whose output is never read: the result's values are undefined, its
    gradients are exact, and the down projection is skipped where it can be (``_RoutedDownForGradient``)."""
    base, adapters = _unwrap_experts(experts_module)
    num_tokens, top_k = router_indices.shape
    flat_experts = router_indices.reshape(-1)
    order, inverse, offs = route_order(flat_experts, base.num_experts)
    sorted_experts = flat_experts[order]
    x = _GatherRows.apply(hidden, order // top_k, inverse, top_k)  # [T*K, H], grouped by expert
    # Eager CUDA callers get the two fused kernels; inside a compiled decoder layer (kernels/layer.py) the
    # surrounding graph fuses them anyway, and a nested torch.compile there would only get in the way.
    fuse = x.is_cuda and not torch.compiler.is_compiling()
    bias_swiglu = _compiled(swiglu.bias_swiglu) if fuse else swiglu.bias_swiglu
    bias_route = _compiled(_bias_route) if fuse else _bias_route
    # In a recompute pass backward follows at once: gate_up's decoded stack serves its dX too.
    gate_up = _projection(x, base, "gate_up_proj", adapters, offs, keep_decoded=gradient_only)
    if gradient_only and _down_for_gradient_supported(base, adapters):
        (lora_a, lora_b, scaling), = adapters.get("down_proj", ((None, None, 0.0),))
        if lora_a is not None:
            lora_a, lora_b = _lora_operands(lora_a, lora_b, gate_up.dtype)
        mxfp4 = has_mxfp4_experts(base)
        frozen = base.down_proj_blocks if mxfp4 else base.down_proj.to(gate_up.dtype)
        scales = base.down_proj_scales if mxfp4 else None
        out = _RoutedDownForGradient.apply(gate_up, routing_weights.reshape(-1)[order], lora_a, lora_b, frozen,
                                           scales, base.down_proj_bias, base.gate_up_proj_bias, order // top_k,
                                           sorted_experts, offs, float(scaling), num_tokens, float(base.alpha),
                                           float(base.limit))
        return out.to(hidden.dtype)
    act = bias_swiglu(gate_up, base.gate_up_proj_bias, sorted_experts, base.alpha, base.limit)
    down = _projection(act, base, "down_proj", adapters, offs)
    if not torch.is_grad_enabled():  # nothing to differentiate: one gather-reduce, no [T*K, H] intermediate
        combine = _compiled(_combine) if fuse else _combine
        return combine(down, inverse, base.down_proj_bias, router_indices, routing_weights).to(hidden.dtype)
    down = bias_route(down, base.down_proj_bias, sorted_experts, routing_weights.reshape(-1)[order])
    # Back to (token, k) order without atomics: gather by the inverse permutation, then sum the K contributions.
    unsorted = _GatherRows.apply(down, inverse, order, 1)
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


def _fast_mlp_forward(mlp, hidden_states, gradient_only: bool = False):
    """Replacement for GptOssMLP.forward with the same inputs and outputs (``gradient_only``: see
    ``moe_experts_forward``)."""
    batch_size, seq_len, hidden_dim = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden_dim)
    routed = mlp.router(flat)
    # transformers 5.x routers return (logits, top-k scores, indices); older ones (scores over all experts, indices).
    router_scores, router_indices = routed[-2], routed[-1]
    top_k_weights = router_scores
    if router_scores.shape[-1] != router_indices.shape[-1]:
        top_k_weights = router_scores.gather(-1, router_indices)
    out = moe_experts_forward(flat, router_indices, top_k_weights, mlp.experts, gradient_only=gradient_only)
    return out.reshape(batch_size, seq_len, hidden_dim), router_scores


def install_fast_experts(model) -> int:
    """Route every GptOssMLP of ``model`` through the grouped path; returns the number of layers switched.

    Patched per instance (not via transformers' experts registry) because the registry dispatches inside the experts
    module, which PEFT's ParamWrappers wrap: by then the LoRA has already been folded into a full-size weight."""
    switched = 0
    for module in model.modules():
        if type(module).__name__ == "GptOssMLP" and hasattr(module, "router") and hasattr(module, "experts"):
            module.forward = functools.partial(_fast_mlp_forward, module)
            switched += 1
    return switched
