"""Attention with gpt-oss's learned sinks, for training: FlexAttention on CUDA, an explicit-mask reference elsewhere.

gpt-oss adds one learned logit per head (the "sink") to every softmax row and then drops it, so each row's
probabilities sum to less than one. Flash kernels have no sink backward and transformers refuses SDPA for this model,
so the HF recipe runs eager attention, which materialises [B, H, L, L] scores several times (DESIGN.md §3: ~1.5 s of a
2.5 s step). Folding the sink in afterwards is exact:

    softmax([s, sink])[:-1] @ v  =  (softmax(s) @ v) * exp(lse) / (exp(lse) + exp(sink))
                                 =  out * sigmoid(lse - sink)

where ``lse`` is the row's log-sum-exp over the real keys, which FlexAttention returns (and differentiates through).
The mask (causal, the 128-token sliding window, packed documents, padding) is a FlexAttention ``mask_mod``; the same
predicate builds the dense mask of the CPU reference, so the CPU tests check the mask logic the GPU path uses.

Packed sequences: documents are found from ``position_ids`` (a new document starts wherever the position does not
continue the previous one), so a collator that packs examples and restarts positions at 0 keeps them apart.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

ATTENTION_NAME = "gptoss_flex_sinks"


# --------------------------------------------------------------------------------------------- mask construction
def document_ids_from_positions(position_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[B, L] int32 document index per token: a document starts where the position does not continue (p != prev + 1)."""
    pos = position_ids.expand(batch_size, -1) if position_ids.shape[0] == 1 else position_ids
    starts = torch.ones_like(pos, dtype=torch.int32)
    starts[:, 1:] = (pos[:, 1:] != pos[:, :-1] + 1).to(torch.int32)
    return torch.cumsum(starts, dim=1, dtype=torch.int32)


def make_mask_mod(document_ids: torch.Tensor | None, key_padding: torch.Tensor | None, sliding_window: int | None,
                  q_offset: int = 0) -> Callable:
    """The attention predicate for (batch, head, query, key) indices: causal, optional window, same document, not padding.

    Works on scalar index tensors (FlexAttention's vmap) and on broadcast index grids (the dense CPU reference).
    Query index ``q`` refers to position ``q + q_offset`` of the key sequence (training: offset 0).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        q_abs = q_idx + q_offset
        allowed = kv_idx <= q_abs
        if sliding_window is not None:
            allowed = allowed & (kv_idx > q_abs - sliding_window)
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q_abs] == document_ids[b, kv_idx])
        if key_padding is not None:
            allowed = allowed & key_padding[b, kv_idx]
        return allowed

    return mask_mod


def dense_mask(mask_mod: Callable, batch_size: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """[B, 1, Lq, Lkv] bool from a mask_mod, by broadcasting index grids (no vmap)."""
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(q_len, device=device).view(1, 1, -1, 1)
    kv = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    return mask_mod(b, h, q, kv).expand(batch_size, 1, q_len, kv_len)


def _key_padding(attention_mask, batch_size: int, kv_len: int) -> torch.Tensor | None:
    """The 2-D padding mask transformers hands the attention function (we register FA2's mask builder, see below)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"{ATTENTION_NAME} expects a 2-D padding mask (or none), got shape {tuple(attention_mask.shape)}; "
            "a 4-D mask means another attention implementation built it: set the implementation with "
            "gptoss_train.kernels.install_sink_attention(model)")
    return attention_mask[:, -kv_len:].to(torch.bool).expand(batch_size, kv_len)


# ------------------------------------------------------------------------------------------------ the math
def sink_attention_reference(query, key, value, sinks, *, scaling: float, mask: torch.Tensor) -> torch.Tensor:
    """Pure-torch sink attention with the same fold as the fast path. q [B,Hq,L,D], k/v [B,Hkv,S,D], mask [B,1,L,S].

    Returns [B, L, Hq, D] like transformers' attention functions. Used on CPU and as the numerics reference."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1, keepdim=True)
    # A query with no visible key (left padding) has lse = -inf: give it zero output, as FlexAttention does.
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores.float() - finite_lse).to(value.dtype)
    out = torch.matmul(probs, value)
    gate = torch.sigmoid(lse - sinks.float().view(1, -1, 1, 1))
    return (out.float() * gate).to(query.dtype).transpose(1, 2).contiguous()


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Each sequence length x (grad, no-grad) x mask sparsity is one specialisation; the default limit of 8 was hit by
    # a run that trained 2K, 16K, 32K and 64K in one process, and past it dynamo silently runs flex uncompiled.
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(flex_attention, dynamic=False)


try:  # imported here, not inside _flex_with_lse, which dynamo traces as part of a compiled decoder layer
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:  # torch without FlexAttention: the CPU reference path still works
    _flex_attention = None
try:  # torch >= 2.9 asks for auxiliary outputs through AuxRequest; older versions take return_lse
    from torch.nn.attention.flex_attention import AuxRequest as _AuxRequest
except ImportError:
    _AuxRequest = None


# Backward tiles for gpt-oss's head dim 64 in bf16 on Hopper, measured at 4 x 2048 on the H100
# (scripts/bench_attention_gpu.py, docs/benchmarks.md): forward + backward of a full-attention layer 2.28 -> 2.01 ms,
# of a sliding-window layer 1.23 -> 1.04 ms, same gradients. Inductor's default choice is kept elsewhere (other
# GPUs, float32, other head dims), where these tiles were not measured.
HOPPER_BF16_HEAD64_OPTIONS = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                              "bwd_num_warps": 4, "bwd_num_stages": 3}


# CUDA device index -> whether it is a Hopper (compute capability 9.0). Filled eagerly (``_note_device``, from the
# mask builder, which runs before any attention call): the query happens outside the traced layer graph.
_HOPPER_DEVICES: dict[int, bool] = {}


def _note_device(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _HOPPER_DEVICES:
            _HOPPER_DEVICES[index] = torch.cuda.get_device_capability(index) == (9, 0)


def flex_kernel_options(query: torch.Tensor) -> dict | None:
    """FlexAttention kernel options for this query: the measured Hopper tiles where they apply, else None."""
    if (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] == 64
            and _HOPPER_DEVICES.get(query.device.index, False)):
        return dict(HOPPER_BF16_HEAD64_OPTIONS)
    return None


def _flex_with_lse(query, key, value, block_mask, scaling):
    # Inside a compiled decoder layer (kernels/layer.py) flex is traced in place; eager callers use the compiled one.
    flex = _flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    options = flex_kernel_options(query)
    if _AuxRequest is not None:
        out, aux = flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True,
                        return_aux=_AuxRequest(lse=True), kernel_options=options)
        return out, aux.lse
    return flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True, return_lse=True,
                kernel_options=options)


class _BlockMaskCache:
    """One BlockMask per (mask inputs, window, shape): the 24 layers and the recompute pass reuse it.

    Keys hold the input tensors themselves (identity + in-place version), so a new batch builds a new mask and a stale
    one is never reused; only the most recent few entries are kept."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[tuple, object]] = []

    @staticmethod
    def _same(a, b) -> bool:
        if a is None or b is None:
            return a is b
        return a is b[0] and a._version == b[1]

    def get(self, position_ids, attention_mask, window, shape, build):
        for key, mask in self.entries:
            if (key[2] == window and key[3] == shape and self._same(position_ids, key[0])
                    and self._same(attention_mask, key[1])):
                return mask
        mask = build()
        ver = lambda t: None if t is None else (t, t._version)  # noqa: E731
        self.entries = [((ver(position_ids), ver(attention_mask), window, shape), mask)] + self.entries[: self.size - 1]
        return mask


_block_masks = _BlockMaskCache()


def _block_mask(position_ids, attention_mask, sliding_window, batch_size, q_len, kv_len, device):
    """The BlockMask for these inputs, cached on the input tensors themselves (the same objects reach every layer of
    a forward; transformers' default positions are passed as None, see kernels/layer.py, so a run without packing
    or padding builds each mask once). Building it never synchronises with the GPU: given positions always carry
    the document lookup (deciding whether a batch has several documents per row would read the GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def build():
        _note_device(device)
        padding = _key_padding(attention_mask, batch_size, kv_len)
        doc = None if position_ids is None else document_ids_from_positions(position_ids, batch_size)
        mask_mod = make_mask_mod(doc, padding, sliding_window, q_offset=kv_len - q_len)
        return create_block_mask(mask_mod, B=batch_size, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device,
                                 _compile=torch.device(device).type == "cuda")  # CPU (tests): small, eager

    return _block_masks.get(position_ids, attention_mask, sliding_window, (batch_size, q_len, kv_len), build)


def layer_block_mask(attention_mask, position_ids, sliding_window, batch_size: int, seq_len: int, device):
    """The (cached) BlockMask a training forward of one layer uses: built eagerly, outside any compiled region.
    ``position_ids`` None: one document per row."""
    return _block_mask(position_ids, attention_mask, sliding_window, batch_size, seq_len, seq_len, device)


def sink_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           sliding_window=None, s_aux=None, position_ids=None, block_mask=None, **kwargs):
    """transformers attention-interface function for gpt-oss (registered as ``gptoss_flex_sinks``).

    query [B, Hq, L, D], key/value [B, Hkv, S, D]; returns ([B, L, Hq, D], None). ``block_mask``: a BlockMask the
    caller built already (the compiled decoder layer builds it outside its graph, see ``layer_block_mask``)."""
    if dropout:
        raise ValueError(f"{ATTENTION_NAME} has no attention dropout; set config.attention_dropout = 0")
    sinks = s_aux if s_aux is not None else module.sinks
    scaling = module.scaling if scaling is None else scaling
    batch_size, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    padding = _key_padding(attention_mask, batch_size, kv_len)
    if q_len != kv_len and position_ids is not None:
        position_ids = None  # decoding with a cache: documents are a training-time notion
    if block_mask is not None or query.is_cuda:
        if block_mask is None:
            block_mask = _block_mask(position_ids, attention_mask, sliding_window, batch_size, q_len, kv_len,
                                     query.device)
        out, lse = _flex_with_lse(query, key, value, block_mask, scaling)
        gate = torch.sigmoid(lse - sinks.float().view(1, -1, 1))  # lse [B, Hq, L] float32
        out = (out.float() * gate.unsqueeze(-1)).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None
    doc = None if position_ids is None else document_ids_from_positions(position_ids, batch_size)
    mask = dense_mask(make_mask_mod(doc, padding, sliding_window, q_offset=kv_len - q_len),
                      batch_size, q_len, kv_len, query.device)
    return sink_attention_reference(query, key, value, sinks, scaling=scaling, mask=mask), None


def padding_mask_only(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                      mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers mask builder for this implementation: the 2-D padding mask (its last ``kv_length`` columns) or
    None. Like FA2's builder, without its ``attention_mask.all()`` test, which reads the GPU (a host synchronisation
    per forward and window); an all-ones mask simply masks nothing."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


def register_sink_attention() -> str:
    """Register the function and its mask builder with transformers; returns the implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION_NAME, sink_attention_forward)
    # The mask builder hands over the 2-D padding mask (or None) instead of a dense [B,1,L,S] mask: we build the
    # block-sparse mask ourselves from it plus position_ids and the layer's window.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, padding_mask_only)
    return ATTENTION_NAME


def install_sink_attention(model) -> str:
    """Switch a loaded GptOss model (PEFT-wrapped or not) to the sink attention; returns the implementation name."""
    name = register_sink_attention()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        try:
            base.set_attn_implementation(name)
        except (ValueError, ImportError, AttributeError):
            pass  # older transformers validate names against their own list: set the config field directly below
    for config in {id(c): c for c in (base.config, getattr(getattr(base, "model", None), "config", None)) if c}.values():
        config._attn_implementation = name
    return name
