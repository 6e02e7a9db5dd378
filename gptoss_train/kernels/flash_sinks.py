"""gpt-oss sink attention on PyTorch's built-in FlashAttention-2 kernels (CUDA), forward and backward.

FlashAttention has no sink, but a sink is one extra logit per head in every softmax row whose value vector is zero,
so it folds in exactly through the row's log-sum-exp (same identity as kernels/attention.py):

    forward:   out = flash(q, k, v) * exp(lse - lse'),      lse' = logaddexp(lse, sink)
    backward:  dq, dk, dv = flash_backward(dout, q, k, v, out, lse')
               dsink      = -sum_rows exp(sink - lse') * <dout, out>

The backward holds because FlashAttention's backward recomputes P = exp(s - lse) from the log-sum-exp it is given and
takes D = <dout, out> from the output it is given: handing it the sink-inclusive lse' and the folded output yields
the gradients of the softmax over [keys, sink]. The kernels are PyTorch's own (aten._flash_attention_forward /
_backward: the FlashAttention-2 code vendored in every CUDA build), which take the sliding window, grouped KV heads
and variable-length (packed) sequences natively; transformers' SDPA path cannot be used because SDPA has no
log-sum-exp output and no window.
"""

from __future__ import annotations

import torch


def _window(sliding_window: int | None) -> tuple[int | None, int | None]:
    # gpt-oss's window: key j is visible from query i when i - sliding_window < j <= i, i.e. 127 keys to the left.
    if sliding_window is None:
        return None, None
    return sliding_window - 1, 0


class _SinkFlashAttention(torch.autograd.Function):
    """q [B, L, Hq, D] (or [T, Hq, D] with cu_seqlens), k/v [B, S, Hkv, D]; returns the folded output, same layout."""

    @staticmethod
    def forward(ctx, query, key, value, sinks, scaling: float, sliding_window, cu_seqlens, max_seqlen: int):
        left, right = _window(sliding_window)
        max_q = max_seqlen if cu_seqlens is not None else query.shape[1]
        max_k = max_seqlen if cu_seqlens is not None else key.shape[1]
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            query, key, value, cu_seqlens, cu_seqlens, max_q, max_k, 0.0, True, False, scale=scaling,
            window_size_left=left, window_size_right=right)
        # lse: [B, Hq, L] fp32, or [Hq, T] with cu_seqlens; the sink per head broadcasts along the head axis
        sink = sinks.float().view(-1, 1) if cu_seqlens is not None else sinks.float().view(1, -1, 1)
        lse_all = torch.logaddexp(lse, sink)
        gate = torch.exp(lse - lse_all)  # = sigmoid(lse - sink): the share of the real keys
        gate_rows = gate.transpose(0, 1) if cu_seqlens is not None else gate.transpose(1, 2)  # [.., L, Hq]
        out = (out.float() * gate_rows.unsqueeze(-1)).to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse_all, sinks, rng_state, unused, cu_seqlens)
        ctx.scaling, ctx.window, ctx.max_q, ctx.max_k = scaling, (left, right), max_q, max_k
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse_all, sinks, rng_state, unused, cu_seqlens = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        left, right = ctx.window
        grad_q, grad_k, grad_v = torch.ops.aten._flash_attention_backward(
            grad_out, query, key, value, out, lse_all, cu_seqlens, cu_seqlens, ctx.max_q, ctx.max_k, 0.0, True,
            rng_state, unused, scale=ctx.scaling, window_size_left=left, window_size_right=right)
        grad_sinks = None
        if ctx.needs_input_grad[3]:
            delta = (grad_out.float() * out.float()).sum(-1)  # [B, L, Hq] or [T, Hq]
            lse_rows = lse_all.transpose(0, 1) if cu_seqlens is not None else lse_all.transpose(1, 2)
            sink = sinks.float()
            share = torch.exp(sink - lse_rows)  # the sink's probability per row
            grad_sinks = -(share * delta).reshape(-1, sink.shape[0]).sum(0).to(sinks.dtype)
        return grad_q, grad_k, grad_v, grad_sinks, None, None, None, None


def sink_flash_attention(query, key, value, sinks, *, scaling: float, sliding_window: int | None = None,
                         cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    """Causal sink attention; query [B, Hq, L, D], key/value [B, Hkv, L, D] (transformers' layout).

    Returns [B, L, Hq, D] (the layout transformers' attention functions return). ``cu_seqlens`` (int32 [N + 1]
    offsets into the flattened B * L tokens) and ``max_seqlen`` (an upper bound of the longest document) treat
    the batch as N packed documents that do not attend to each other."""
    batch, _, length, dim = query.shape
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, L, H, D], the last dimension contiguous
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if cu_seqlens is None:
        return _SinkFlashAttention.apply(q, k, v, sinks, scaling, sliding_window, None, length)
    flat = [t.reshape(batch * length, t.shape[2], dim) for t in (q, k, v)]
    out = _SinkFlashAttention.apply(*flat, sinks, scaling, sliding_window, cu_seqlens.to(torch.int32),
                                    max_seqlen or length)
    return out.view(batch, length, -1, dim)
