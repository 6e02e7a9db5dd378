"""gpt-oss forward passes for generation: packed prefill and a one-token decode step over a static KV cache.

transformers' GptOssForCausalLM is written for training and for `generate()` with a dynamic cache: every decode
step re-derives masks, syncs the host once per routed expert (`.nonzero()` in the per-expert loop) and, with its
grouped_mm experts, gathers a `[tokens * top_k, 2880, 5760]` weight copy. This module reads the same parameters
(never copies the model, never merges a LoRA adapter) and runs the forward with:

* experts as two grouped GEMMs over the (token, expert) pairs sorted by expert (`torch.nn.functional.grouped_mm`):
  only the selected experts' weights are read, with no host synchronisation, so the step can be graph-captured;
* a static KV cache: full-attention layers hold `[slots, kv_heads, max_seq_len, head_dim]`, sliding-window layers
  a `[slots, kv_heads, window, head_dim]` ring buffer (position p lives at p % window);
* decode attention for one query token with the sink logit folded into the softmax denominator;
* prefill attention through `scaled_dot_product_attention` with the sink expressed as one extra key (see
  `_sink_sdpa`), over several prompts packed into one sequence.

Numerics follow transformers' eager path (bf16 GEMMs, the router softmax in the activation dtype, RMSNorm in fp32)
so greedy tokens match its `generate()`; softmaxes and the top-k sum run in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class LinearLoRA:
    """One LoRA term `scaling * (x @ a.T) @ b.T` of an nn.Linear (a: [r, in], b: [out, r])."""

    a: Tensor
    b: Tensor
    scaling: float

    def __call__(self, x: Tensor) -> Tensor:
        return (x @ self.a.t()) @ self.b.t() * self.scaling


@dataclass
class ExpertLoRA:
    """LoRA on a stacked expert weight [E, in, out]: delta_e = scaling * lhs[e] @ rhs[e].

    `r` is zero-padded to a multiple of 8 so that grouped GEMMs see 16-byte aligned strides (exact: zero rows).
    """

    lhs: Tensor  # [E, in, r]
    rhs: Tensor  # [E, r, out]
    scaling: float


@dataclass
class LayerWeights:
    sliding: bool
    input_norm: Tensor
    post_norm: Tensor
    norm_eps: float
    qkv_w: Tensor  # [q+k+v, hidden]: the three projections stacked once, one GEMM per step instead of three
    qkv_b: Tensor | None
    o_w: Tensor
    o_b: Tensor | None
    sinks: Tensor  # [heads]
    router_w: Tensor
    router_b: Tensor
    gate_up: Tensor | None  # [E, hidden, 2 * inter], rows interleaved gate/up as in the checkpoint (None: MXFP4)
    gate_up_b: Tensor
    down: Tensor | None  # [E, inter, hidden] (None: MXFP4)
    down_b: Tensor
    lora_q: LinearLoRA | None = None
    lora_k: LinearLoRA | None = None
    lora_v: LinearLoRA | None = None
    lora_o: LinearLoRA | None = None
    lora_gate_up: ExpertLoRA | None = None
    lora_down: ExpertLoRA | None = None
    # MXFP4 bytes kept as they are (checkpoint layout: blocks [E, out, in/32, 16], scales [E, out, in/32]); the fused
    # decode step reads them directly, everything else decodes one layer at a time (`dense_experts`).
    gate_up_mx: tuple[Tensor, Tensor] | None = None
    down_mx: tuple[Tensor, Tensor] | None = None


def dense_experts(layer: LayerWeights) -> tuple[Tensor, Tensor]:
    """[E, in, out] expert matrices in the compute dtype: views of the model, or (MXFP4 kept) decoded for this call."""
    if layer.gate_up is not None:
        return layer.gate_up, layer.down
    from gptoss_train.kernels.moe import decode_mxfp4_experts

    dtype = layer.gate_up_b.dtype
    return (decode_mxfp4_experts(*layer.gate_up_mx, dtype).transpose(-1, -2),
            decode_mxfp4_experts(*layer.down_mx, dtype).transpose(-1, -2))


@dataclass
class ModelWeights:
    layers: list[LayerWeights]
    embed: Tensor
    final_norm: Tensor
    norm_eps: float
    lm_head: Tensor
    cos2: Tensor  # [max_seq_len, head_dim]: [cos, cos] from the model's own rotary embedding (YaRN included)
    sin2: Tensor  # [-sin, sin]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    window: int
    top_k: int
    num_experts: int
    swiglu_alpha: float
    swiglu_limit: float
    dtype: torch.dtype = field(default=torch.bfloat16)

    @property
    def device(self) -> torch.device:
        return self.embed.device


class UnsupportedModel(ValueError):
    """The model (or its adapter) has a part this generation path does not implement."""


def _peft_lora_linear(module) -> tuple[object, LinearLoRA | None]:
    """(base nn.Linear, LoRA term) for a plain nn.Linear or a peft lora.Linear wrapping one."""
    if not hasattr(module, "base_layer") or not hasattr(module, "lora_A"):
        return module, None
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return module.get_base_layer(), None
    names = [n for n in module.active_adapters if n in module.lora_A]
    if len(names) > 1:
        raise UnsupportedModel(f"{len(names)} active LoRA adapters on one layer; activate one")
    if not names:
        return module.get_base_layer(), None
    name = names[0]
    if module.use_dora.get(name, False):
        raise UnsupportedModel("DoRA adapters are not supported by fast generation; merge them first")
    a = module.lora_A[name].weight
    b = module.lora_B[name].weight
    if module.lora_B[name].bias is not None:
        raise UnsupportedModel("LoRA with lora_bias=True is not supported by fast generation")
    return module.get_base_layer(), LinearLoRA(a.detach(), b.detach(), float(module.scaling[name]))


def _expert_lora_factors(wrapper) -> ExpertLoRA | None:
    """LoRA factors of one peft ParamWrapper (target_parameters on GptOssExperts)."""
    if getattr(wrapper, "disable_adapters", False) or getattr(wrapper, "merged", False):
        return None
    names = [n for n in wrapper.active_adapters if n in wrapper.lora_A]
    if not names:
        return None
    if len(names) > 1:
        raise UnsupportedModel(f"{len(names)} active LoRA adapters on the experts; activate one")
    name = names[0]
    e = wrapper.num_experts
    a = wrapper.lora_A[name].weight.detach()  # [r*E, in]
    b = wrapper.lora_B[name].weight.detach()  # [out, r*E]
    if getattr(wrapper, "_did_swap_in_out_features", False):
        raise UnsupportedModel("expert LoRA with swapped in/out features is not supported")
    # Same factorisation as peft's ParamWrapper.get_delta_weight: A rows are expert-major, B columns rank-major.
    lhs = a.reshape(e, -1, a.shape[-1]).transpose(-2, -1)  # [E, in, r]
    rhs = b.reshape(b.shape[0], -1, e).permute(2, 1, 0)  # [E, r, out]
    r = lhs.shape[-1]
    r_pad = (r + 7) // 8 * 8
    if r_pad != r:
        lhs = F.pad(lhs, (0, r_pad - r))
        rhs = F.pad(rhs, (0, 0, 0, r_pad - r))
    return ExpertLoRA(lhs.contiguous(), rhs.contiguous(), float(wrapper.scaling[name]))


def _experts_with_lora(experts) -> tuple[object, dict[str, ExpertLoRA]]:
    """Peel peft ParamWrappers off a GptOssExperts module: (the experts module, {param name: LoRA})."""
    loras: dict[str, ExpertLoRA] = {}
    module = experts
    while hasattr(module, "parameter_name") and hasattr(module, "base_layer"):
        factors = _expert_lora_factors(module)
        if factors is not None:
            loras[module.parameter_name] = factors
        module = module.base_layer
    return module, loras


def _dense_expert_weights(experts, dtype: torch.dtype, keep_mxfp4: bool = False):
    """[E, in, out] expert matrices in the compute dtype.

    MXFP4-resident experts (gptoss_train.kernels.moe.attach_mxfp4_experts: `*_blocks`/`*_scales` buffers beside
    zero-stride placeholders) are decoded once here. Reading MXFP4 inside the grouped GEMM would cut the bytes a
    decode step reads by ~3x; it is the main remaining gap (docs/fast-generation.md).
    """
    mxfp4 = getattr(experts, "gate_up_proj_blocks", None) is not None
    if mxfp4 and getattr(experts, "down_proj_blocks", None) is not None:
        if keep_mxfp4:
            return None, None
        from gptoss_train.quant.mxfp4 import decode

        gu = decode(experts.gate_up_proj_blocks, experts.gate_up_proj_scales, dtype=dtype, transpose=True)
        dn = decode(experts.down_proj_blocks, experts.down_proj_scales, dtype=dtype, transpose=True)
        return gu.contiguous(), dn.contiguous()
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.dim() == 3 and gate_up.is_floating_point():
        if gate_up.stride(0) == 0:
            raise UnsupportedModel("expert weights are placeholders without MXFP4 buffers")
        return gate_up.detach(), down.detach()
    raise UnsupportedModel(f"unrecognised experts module {type(experts).__name__}: no dense or MXFP4 weights")


def unwrap_peft(model):
    """The GptOssForCausalLM inside a PeftModel (or the model itself)."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def collect_weights(model, max_seq_len: int, keep_mxfp4: bool = False) -> ModelWeights:
    """Views of `model`'s parameters (plus the stacked QKV) in the layout the generation forward wants.

    keep_mxfp4: MXFP4-resident experts stay MXFP4 (the fused decode step reads the bytes) instead of being decoded
    to a resident bf16 copy."""
    base = unwrap_peft(model)
    cfg = base.config
    if getattr(cfg, "model_type", None) != "gpt_oss":
        raise UnsupportedModel(f"expected a gpt_oss model, got model_type={getattr(cfg, 'model_type', None)!r}")
    core = base.model
    dtype = core.embed_tokens.weight.dtype
    layers = []
    for i, layer in enumerate(core.layers):
        attn = layer.self_attn
        q, lq = _peft_lora_linear(attn.q_proj)
        k, lk = _peft_lora_linear(attn.k_proj)
        v, lv = _peft_lora_linear(attn.v_proj)
        o, lo = _peft_lora_linear(attn.o_proj)
        router = layer.mlp.router
        if hasattr(router, "base_layer") or hasattr(router, "parameter_name"):
            raise UnsupportedModel("LoRA on the router is not supported by fast generation; merge it first")
        experts, expert_loras = _experts_with_lora(layer.mlp.experts)
        unknown = set(expert_loras) - {"gate_up_proj", "down_proj"}
        if unknown:
            raise UnsupportedModel(f"LoRA on expert parameters {sorted(unknown)} is not supported")
        gate_up, down = _dense_expert_weights(experts, dtype, keep_mxfp4)
        mx = gate_up is None
        qkv_b = None
        if q.bias is not None:
            qkv_b = torch.cat([q.bias, k.bias, v.bias]).detach()
        layers.append(
            LayerWeights(
                sliding=cfg.layer_types[i] == "sliding_attention",
                input_norm=layer.input_layernorm.weight.detach().float(),
                post_norm=layer.post_attention_layernorm.weight.detach().float(),
                norm_eps=layer.input_layernorm.variance_epsilon,
                qkv_w=torch.cat([q.weight, k.weight, v.weight]).detach(),
                qkv_b=qkv_b,
                o_w=o.weight.detach(),
                o_b=None if o.bias is None else o.bias.detach(),
                sinks=attn.sinks.detach(),
                router_w=router.weight.detach(),
                router_b=router.bias.detach(),
                gate_up=gate_up,
                gate_up_b=experts.gate_up_proj_bias.detach(),
                down=down,
                down_b=experts.down_proj_bias.detach(),
                lora_q=lq,
                lora_k=lk,
                lora_v=lv,
                lora_o=lo,
                lora_gate_up=expert_loras.get("gate_up_proj"),
                lora_down=expert_loras.get("down_proj"),
                gate_up_mx=(experts.gate_up_proj_blocks, experts.gate_up_proj_scales) if mx else None,
                down_mx=(experts.down_proj_blocks, experts.down_proj_scales) if mx else None,
            )
        )
    first_experts, _ = _experts_with_lora(core.layers[0].mlp.experts)
    head, head_lora = _peft_lora_linear(base.lm_head)
    if head_lora is not None:
        raise UnsupportedModel("LoRA on lm_head is not supported by fast generation")
    device = core.embed_tokens.weight.device
    # The model's own rotary module computes cos/sin (YaRN scaling included) exactly as its forward does.
    positions = torch.arange(max_seq_len, device=device)[None]
    probe = torch.zeros(1, dtype=dtype, device=device)
    with torch.no_grad():
        cos, sin = core.rotary_emb(probe, positions)
    return ModelWeights(
        layers=layers,
        embed=core.embed_tokens.weight.detach(),
        final_norm=core.norm.weight.detach().float(),
        norm_eps=core.norm.variance_epsilon,
        lm_head=head.weight.detach(),
        cos2=torch.cat([cos[0], cos[0]], dim=-1).contiguous(),
        sin2=torch.cat([-sin[0], sin[0]], dim=-1).contiguous(),
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        scaling=cfg.head_dim**-0.5,
        window=int(cfg.sliding_window or 0),
        top_k=cfg.num_experts_per_tok,
        num_experts=cfg.num_local_experts,
        # transformers 5.17 keeps these on the experts module only; 5.23 also on the config.
        swiglu_alpha=float(getattr(first_experts, "alpha", getattr(cfg, "swiglu_alpha", 1.702))),
        swiglu_limit=float(getattr(first_experts, "limit", getattr(cfg, "swiglu_limit", 7.0))),
        dtype=dtype,
    )


# ----------------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------------


class KVCache:
    """Static per-slot cache. Full layers: [slots, kv_heads, max_seq_len, D]; sliding layers: ring of `window`."""

    def __init__(self, w: ModelWeights, slots: int, max_seq_len: int):
        self.max_seq_len = max_seq_len
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        for layer in w.layers:
            length = w.window if layer.sliding else max_seq_len
            shape = (slots, w.num_kv_heads, length, w.head_dim)
            self.k.append(torch.zeros(shape, dtype=w.dtype, device=w.device))
            self.v.append(torch.zeros(shape, dtype=w.dtype, device=w.device))


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # GptOssRMSNorm's arithmetic (fp32 statistics, fp32 weight applied before the cast back) in one fused op.
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps).to(x.dtype)


def rope(x: Tensor, cos2: Tensor, sin2: Tensor) -> Tensor:
    """GptOss' half-split rotation. x [T, heads, D]; cos2 = [cos, cos], sin2 = [-sin, sin], both [T, D].

    x * cos2 + roll(x, D/2) * sin2 is the same arithmetic as [a*cos - b*sin, b*cos + a*sin] (a - b == a + (-b)),
    in three kernels instead of seven; q and k heads go through it together.
    """
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos2[:, None, :], rolled, sin2[:, None, :])


def grouped_mm_supported(weight: Tensor) -> bool:
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    if weight.device.type == "cuda":
        return weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(weight.device) >= (8, 0)
    return weight.device.type == "cpu"


def expert_mm(x_sorted: Tensor, weight: Tensor, offs: Tensor, expert_of_row: Tensor, use_grouped: bool) -> Tensor:
    """Row i of `x_sorted` times weight[expert_of_row[i]]; rows sorted by expert, offs = cumulative row counts.

    The grouped GEMM reads each selected expert once and skips the others. The fallback (fp32 on CUDA, or a torch
    without grouped_mm) gathers one weight copy per row: fine for small models, a memory hog at 20b.
    """
    if use_grouped:
        fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
        return fn(x_sorted, weight, offs=offs)
    return torch.bmm(x_sorted[:, None, :], weight[expert_of_row]).squeeze(1)


def swiglu(gate_up: Tensor, alpha: float, limit: float) -> Tensor:
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def route(logits: Tensor, top_k: int, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-k routing, pairs sorted by expert: (scores of sorted pairs, order, expert of each sorted pair,
    token of each sorted pair, cumulative pair count per expert as int32)."""
    top_v, top_i = torch.topk(logits, top_k, dim=-1)
    scores = torch.softmax(top_v, dim=1, dtype=top_v.dtype)  # activation dtype, as GptOssTopKRouter
    expert_ids = top_i.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return scores.reshape(-1)[order], order, expert_ids[order], torch.div(order, top_k, rounding_mode="floor"), offs


def combine(out: Tensor, scores_sorted: Tensor, order: Tensor, top_k: int, dtype: torch.dtype) -> Tensor:
    """Weight each sorted pair's expert output, un-sort, add a token's top-k outputs in fp32.

    Deterministic (no atomics), unlike index_add_ on CUDA."""
    out = out * scores_sorted[:, None]
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted.view(-1, top_k, out.shape[-1]).sum(dim=1, dtype=torch.float32).to(dtype)


def moe(w: ModelWeights, layer: LayerWeights, h: Tensor, use_grouped: bool) -> Tensor:
    """Routed experts for h [T, hidden] with no host synchronisation (graph-capturable)."""
    logits = F.linear(h, layer.router_w, layer.router_b)
    scores_sorted, order, expert_sorted, token_sorted, offs = KERNELS["route"](logits, w.top_k, w.num_experts)
    x = h[token_sorted]
    gate_up_w, down_w = dense_experts(layer)
    gate_up = expert_mm(x, gate_up_w, offs, expert_sorted, use_grouped) + layer.gate_up_b[expert_sorted]
    if layer.lora_gate_up is not None:
        gate_up = gate_up + _expert_lora(x, layer.lora_gate_up, offs, expert_sorted, use_grouped)
    act = KERNELS["swiglu"](gate_up, w.swiglu_alpha, w.swiglu_limit)
    out = expert_mm(act, down_w, offs, expert_sorted, use_grouped) + layer.down_b[expert_sorted]
    if layer.lora_down is not None:
        out = out + _expert_lora(act, layer.lora_down, offs, expert_sorted, use_grouped)
    return KERNELS["combine"](out, scores_sorted, order, w.top_k, h.dtype)


def _expert_lora(x: Tensor, lora: ExpertLoRA, offs: Tensor, expert_of_row: Tensor, use_grouped: bool) -> Tensor:
    t = expert_mm(x, lora.lhs, offs, expert_of_row, use_grouped)
    return expert_mm(t, lora.rhs, offs, expert_of_row, use_grouped) * lora.scaling


def qkv_rope(
    w: ModelWeights, layer: LayerWeights, h: Tensor, cos2: Tensor, sin2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Projected, rotated q [T, H, D], k [T, Hkv, D] and v [T, Hkv, D]."""
    qkv = F.linear(h, layer.qkv_w, layer.qkv_b)
    t = h.shape[0]
    q_dim = w.num_heads * w.head_dim
    kv_dim = w.num_kv_heads * w.head_dim
    if layer.lora_q is not None or layer.lora_k is not None or layer.lora_v is not None:
        delta = [
            lora(h) if lora is not None else h.new_zeros(t, dim)
            for lora, dim in ((layer.lora_q, q_dim), (layer.lora_k, kv_dim), (layer.lora_v, kv_dim))
        ]
        qkv = qkv + torch.cat(delta, dim=-1)
    heads = qkv.view(t, w.num_heads + 2 * w.num_kv_heads, w.head_dim)
    qk = KERNELS["rope"](heads[:, : w.num_heads + w.num_kv_heads], cos2, sin2)
    return qk[:, : w.num_heads], qk[:, w.num_heads :], heads[:, w.num_heads + w.num_kv_heads :]


def out_projection(layer: LayerWeights, attn: Tensor) -> Tensor:
    out = F.linear(attn, layer.o_w, layer.o_b)
    if layer.lora_o is not None:
        out = out + layer.lora_o(attn)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Prefill: several prompts packed into one token sequence
# ----------------------------------------------------------------------------------------------------------------------


def _sink_sdpa(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, scale: float, allowed: Tensor) -> Tensor:
    """Attention with a per-head sink logit through scaled_dot_product_attention.

    q [H, Lq, D], k/v [H, Lk, D] (kv heads already repeated), allowed [Lq, Lk] bool. The sink is one extra key whose
    logit is sinks[h] for every query and whose value is zero: the head dim grows by 8 (alignment), the query carries
    sinks[h] / scale in the first extra column and the sink key a one there; real keys carry zeros. Keys are padded to
    a multiple of 8 (masked) so the memory-efficient kernel takes the boolean mask as is.
    """
    heads, lq, d = q.shape
    lk = k.shape[1]
    pad_d = 8
    pad_k = (-(lk + 1)) % 8
    qx = q.new_zeros(heads, lq, d + pad_d)
    qx[..., :d] = q
    qx[..., d] = (sinks.to(torch.float32) / scale).to(q.dtype)[:, None]
    kx = k.new_zeros(heads, 1 + lk + pad_k, d + pad_d)
    kx[:, 0, d] = 1
    kx[:, 1 : 1 + lk, :d] = k
    vx = v.new_zeros(heads, 1 + lk + pad_k, d + pad_d)
    vx[:, 1 : 1 + lk, :d] = v
    mask = allowed.new_zeros(lq, 1 + lk + pad_k)
    mask[:, 0] = True
    mask[:, 1 : 1 + lk] = allowed
    out = F.scaled_dot_product_attention(qx[None], kx[None], vx[None], attn_mask=mask[None, None], scale=scale)
    return out[0, :, :, :d]


def prefill_attention(
    w: ModelWeights, layer: LayerWeights, q: Tensor, k: Tensor, v: Tensor, spans: list[tuple[int, int]], q_chunk: int
) -> Tensor:
    """Causal (or sliding-window) attention of each packed prompt over itself. q [T, H, D], k/v [T, Hkv, D]."""
    out = torch.empty_like(q)
    groups = w.num_heads // w.num_kv_heads
    window = w.window if layer.sliding else None
    for start, length in spans:
        for qs in range(0, length, q_chunk):
            qe = min(length, qs + q_chunk)
            ks = 0 if window is None else max(0, qs - window + 1)
            qpos = torch.arange(qs, qe, device=q.device)[:, None]
            kpos = torch.arange(ks, qe, device=q.device)[None, :]
            allowed = kpos <= qpos
            if window is not None:
                allowed &= kpos > qpos - window
            kk = k[start + ks : start + qe].transpose(0, 1).repeat_interleave(groups, dim=0)
            vv = v[start + ks : start + qe].transpose(0, 1).repeat_interleave(groups, dim=0)
            qq = q[start + qs : start + qe].transpose(0, 1)
            out[start + qs : start + qe] = _sink_sdpa(qq, kk, vv, layer.sinks, w.scaling, allowed).transpose(0, 1)
    return out


def prefill(
    w: ModelWeights,
    cache: KVCache,
    prompts: list[list[int]],
    slots: list[int],
    use_grouped: bool,
    q_chunk: int = 1024,
    all_logits: bool = False,
) -> Tensor:
    """Run prompts (packed), fill their cache slots; return fp32 logits of each prompt's last token [n, V]
    (or of every token [T, V] with all_logits=True, for checks)."""
    device = w.device
    spans, ids, pos = [], [], []
    for p in prompts:
        spans.append((len(ids), len(p)))
        ids.extend(p)
        pos.extend(range(len(p)))
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    pos_t = torch.tensor(pos, dtype=torch.long, device=device)
    cos2, sin2 = w.cos2[pos_t], w.sin2[pos_t]
    x = w.embed[ids_t]
    for li, layer in enumerate(w.layers):
        h = KERNELS["rms_norm"](x, layer.input_norm, layer.norm_eps)
        q, k, v = qkv_rope(w, layer, h, cos2, sin2)
        for (start, length), slot in zip(spans, slots):
            if layer.sliding:
                keep = torch.arange(max(0, length - w.window), length, device=device)
                cache.k[li][slot][:, keep % w.window] = k[start + keep].transpose(0, 1)
                cache.v[li][slot][:, keep % w.window] = v[start + keep].transpose(0, 1)
            else:
                cache.k[li][slot, :, :length] = k[start : start + length].transpose(0, 1)
                cache.v[li][slot, :, :length] = v[start : start + length].transpose(0, 1)
        attn = prefill_attention(w, layer, q, k, v, spans, q_chunk)
        x = x + out_projection(layer, attn.reshape(x.shape[0], -1))
        h = KERNELS["rms_norm"](x, layer.post_norm, layer.norm_eps)
        x = x + moe(w, layer, h, use_grouped)
    if not all_logits:
        last = torch.tensor([s + n - 1 for s, n in spans], dtype=torch.long, device=device)
        x = x[last]
    x = rms_norm(x, w.final_norm, w.norm_eps)
    return F.linear(x, w.lm_head).float()


# ----------------------------------------------------------------------------------------------------------------------
# Decode: one token for each of the first `batch` slots, static shapes
# ----------------------------------------------------------------------------------------------------------------------


def decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, sinks: Tensor, scale: float
) -> Tensor:
    """One query token per slot. q [B, H, D]; keys/values [B, Hkv, L, D]; valid [B, L] bool."""
    batch, heads, d = q.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    qg = q.reshape(batch, kv_heads, groups, d)
    scores = torch.matmul(qg, keys.transpose(-1, -2))  # [B, Hkv, G, L], activation dtype as the eager path
    probs = KERNELS["sink_softmax"](scores, valid, sinks, scale)
    out = torch.matmul(probs, values)  # [B, Hkv, G, D]
    return out.reshape(batch, heads * d)


def sink_softmax(scores: Tensor, valid: Tensor, sinks: Tensor, scale: float) -> Tensor:
    """softmax([scores * scale, sink]) without the sink column, masked by valid [B, L]; scores [B, Hkv, G, L]."""
    batch, kv_heads, groups, _ = scores.shape
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    # The sink is one more logit per head; divided by `scale` here because the scale multiplies the whole row
    # below (scale is a power of two for gpt-oss: exact).
    sink = (sinks.float() / scale).to(scores.dtype).view(1, kv_heads, groups, 1).expand(batch, -1, -1, -1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1) * scale, dim=-1, dtype=torch.float32)
    return probs[..., :-1].to(scores.dtype)


def decode_step(
    w: ModelWeights, cache: KVCache, tokens: Tensor, positions: Tensor, kv_len: int, use_grouped: bool
) -> Tensor:
    """Logits [B, V] (fp32) for tokens [B] at positions [B] of slots 0..B-1; writes their K/V into the cache.

    `kv_len` (static) bounds the full-attention keys read: every slot's position must be < kv_len. Slots beyond
    the live ones compute garbage in their own cache rows only.
    """
    batch = tokens.shape[0]
    rows = torch.arange(batch, device=tokens.device)
    cos2, sin2 = w.cos2[positions], w.sin2[positions]
    full_valid = torch.arange(kv_len, device=tokens.device)[None, :] <= positions[:, None]
    ring_valid = torch.arange(max(w.window, 1), device=tokens.device)[None, :] <= positions[:, None]
    ring_pos = positions % max(w.window, 1)
    x = w.embed[tokens]
    for li, layer in enumerate(w.layers):
        h = KERNELS["rms_norm"](x, layer.input_norm, layer.norm_eps)
        q, k, v = qkv_rope(w, layer, h, cos2, sin2)
        kc, vc = cache.k[li], cache.v[li]
        if layer.sliding:
            kc[rows, :, ring_pos] = k
            vc[rows, :, ring_pos] = v
            attn = decode_attention(q, kc[:batch], vc[:batch], ring_valid, layer.sinks, w.scaling)
        else:
            kc[rows, :, positions] = k
            vc[rows, :, positions] = v
            attn = decode_attention(
                q, kc[:batch, :, :kv_len], vc[:batch, :, :kv_len], full_valid, layer.sinks, w.scaling
            )
        x = x + out_projection(layer, attn)
        h = KERNELS["rms_norm"](x, layer.post_norm, layer.norm_eps)
        x = x + moe(w, layer, h, use_grouped)
    x = rms_norm(x, w.final_norm, w.norm_eps)
    return F.linear(x, w.lm_head).float()


def fused_decode_supported(w: ModelWeights, batch: int, use_grouped: bool) -> bool:
    """Whether `decode_step_fused` covers this model and batch (Triton on CUDA, grouped GEMM experts)."""
    from gptoss_train.kernels import gen_kernels

    return (
        gen_kernels.available(w.device)
        and use_grouped
        and batch * w.top_k <= gen_kernels.MAX_FUSED_PAIRS
        and (w.head_dim & (w.head_dim - 1)) == 0
    )


def decode_step_fused(
    w: ModelWeights, cache: KVCache, tokens: Tensor, positions: Tensor, kv_len: int, use_grouped: bool
) -> Tensor:
    """`decode_step` with its small kernels fused (gen_kernels): 12 launches a layer instead of ~62.

    Same contract and numerics as `decode_step` up to reduction order and the online softmax in attention.
    LoRA terms are added with plain torch ops between the fused kernels."""
    from gptoss_train.kernels import gen_kernels as K

    x = w.embed[tokens]
    _, h = K.add_rms_norm(x, None, w.layers[0].input_norm, w.layers[0].norm_eps)
    for li, layer in enumerate(w.layers):
        qkv = F.linear(h, layer.qkv_w, layer.qkv_b)
        if layer.lora_q is not None or layer.lora_k is not None or layer.lora_v is not None:
            t = h.shape[0]
            q_dim, kv_dim = w.num_heads * w.head_dim, w.num_kv_heads * w.head_dim
            qkv = qkv + torch.cat([
                lora(h) if lora is not None else h.new_zeros(t, dim)
                for lora, dim in ((layer.lora_q, q_dim), (layer.lora_k, kv_dim), (layer.lora_v, kv_dim))
            ], dim=-1)
        kc, vc = cache.k[li], cache.v[li]
        q = K.rope_kv_write(qkv, positions, w.cos2, w.sin2, kc, vc, w.num_heads, ring=layer.sliding)
        keys = kc.shape[2] if layer.sliding else kv_len  # the whole ring, or the live bucket of a full layer
        attn = K.decode_attention(q, kc, vc, positions, layer.sinks, w.scaling, keys)
        x, h = K.add_rms_norm(x, out_projection(layer, attn), layer.post_norm, layer.norm_eps)
        logits = F.linear(h, layer.router_w, layer.router_b)
        scores, _, expert_sorted, token_sorted, offs, inv = K.route_sort(logits, w.top_k, h.dtype)
        mx = layer.gate_up_mx is not None
        small = token_sorted.shape[0] <= K.EXPERT_GEMM_MAX_PAIRS
        if mx:  # MXFP4 bytes decoded in registers, any batch
            gate_up = K.expert_gemm_mxfp4(h, *layer.gate_up_mx, offs, x_rows=token_sorted)
        elif small:  # Triton expert GEMM, reading the routed tokens' rows of h directly
            gate_up = K.expert_gemm(h, layer.gate_up, offs, x_rows=token_sorted)
        else:
            gate_up = expert_mm(h[token_sorted], layer.gate_up, offs, expert_sorted, use_grouped)
        if layer.lora_gate_up is not None:
            gate_up = gate_up + _expert_lora(h[token_sorted], layer.lora_gate_up, offs, expert_sorted, use_grouped)
        act = K.bias_swiglu(gate_up, layer.gate_up_b, expert_sorted, w.swiglu_alpha, w.swiglu_limit)
        if mx:
            out = K.expert_gemm_mxfp4(act, *layer.down_mx, offs)
        elif small:
            out = K.expert_gemm(act, layer.down, offs)
        else:
            out = expert_mm(act, layer.down, offs, expert_sorted, use_grouped)
        if layer.lora_down is not None:
            out = out + _expert_lora(act, layer.lora_down, offs, expert_sorted, use_grouped)
        last = li + 1 == len(w.layers)
        norm_w = w.final_norm if last else w.layers[li + 1].input_norm
        eps = w.norm_eps if last else w.layers[li + 1].norm_eps
        x, h = K.moe_combine_add_rms_norm(x, out, layer.down_b, expert_sorted, scores, inv, norm_w, eps, w.top_k)
    return F.linear(h, w.lm_head).float()


# The small element-wise pieces of the prefill and of the eager decode step. (A torch.compile'd variant was tried
# on torch 2.11; its "capture failure" was a stale graph pool, not the compiler. The fused Triton decode step,
# gen_kernels, replaced it.)
KERNELS = dict(
    rms_norm=rms_norm, rope=rope, swiglu=swiglu, route=route, combine=combine, sink_softmax=sink_softmax
)
