#!/usr/bin/env python3
"""Sink attention at the 20b training shape (4 x 2048, 64 query heads, 8 KV heads, head dim 64), full and 128-token
sliding window: FlexAttention (what the compiled layers use; with a few kernel options) against PyTorch's built-in
FlashAttention-2 kernels (aten._flash_attention_forward/backward, which take a window and grouped KV heads) with the
sink folded in through the log-sum-exp. Forward (autograd off) and forward + backward, CUDA events, median of 20;
gradients of each against the fp32 explicit-mask reference.

    source scripts/device_setup.sh; python scripts/bench_attention_gpu.py [--autotune]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_decode_gpu import time_ms  # noqa: E402  (scripts/ is on the path when run as a script)

from gptoss_train.kernels import attention  # noqa: E402

# ------------------------------------------------------------------------------------------------------------------
# The alternative measured against flex: gpt-oss sink attention on PyTorch's built-in FlashAttention-2 kernels.
#
# FlashAttention has no sink, but a sink is one extra logit per head in every softmax row whose value vector is zero,
# so it folds in exactly through the row's log-sum-exp (the identity of kernels/attention.py):
#     forward:   out = flash(q, k, v) * exp(lse - lse'),      lse' = logaddexp(lse, sink)
#     backward:  dq, dk, dv = flash_backward(dout, q, k, v, out, lse');  dsink = -sum_rows exp(sink - lse') <dout, out>
# FlashAttention's backward recomputes P = exp(s - lse) from the lse it is given and takes D = <dout, out> from the
# output it is given, so handing it the sink-inclusive lse' and the folded output yields the gradients of the softmax
# over [keys, sink]. aten._flash_attention_forward/_backward take the window and grouped KV heads natively. Slower
# than flex at this shape on the H100 (docs/benchmarks.md), so it lives here, not in the library.


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

BATCH, SEQ, HEADS, KV_HEADS, DIM = 4, 2048, 64, 8, 64
SCALE = DIM ** -0.5


def attention_flops(window: int | None, backward: bool) -> float:
    pairs = sum(min(i + 1, window or i + 1) for i in range(SEQ))  # visible (query, key) pairs per row and head
    forward = 4 * BATCH * HEADS * pairs * DIM
    return forward * (3.5 if backward else 1.0)  # backward ~2.5x forward (5 GEMMs vs 2)


def flex_fn(window, options):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    block_mask = attention.layer_block_mask(None, None, window, BATCH, SEQ, "cuda")

    def run(q, k, v, sinks):
        out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=SCALE, enable_gqa=True,
                                  return_aux=AuxRequest(lse=True), kernel_options=options or None)
        gate = torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1))
        return (out.float() * gate.unsqueeze(-1)).to(q.dtype)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--autotune", action="store_true", help="only flex under max-autotune (slow to compile)")
    args = parser.parse_args()
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(BATCH, HEADS, SEQ, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(BATCH, KV_HEADS, SEQ, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(BATCH, KV_HEADS, SEQ, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    sinks = torch.randn(HEADS, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad = torch.randn(BATCH, HEADS, SEQ, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)

    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = dynamo_config.cache_size_limit = 256  # one compilation per variant and window
    safe = {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}  # causal/window/documents, no padding
    flex_options = {
        "flex (as shipped)": {},
        "flex rows safe, contiguous": safe,
        "flex bwd 32/128/128/32 w4 s3": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                         "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 3},
        "flex bwd 64/128/128/64 w8 s2": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                         "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 2},
        "flex bwd 64/128/128/64 w8 s3": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                         "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 3},
        "flex bwd 64/64/64/64 w4 s3": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                                       "bwd_BLOCK_N2": 64, "bwd_num_warps": 4, "bwd_num_stages": 3},
        "flex fwd 128/64 w4 s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
        "flex fwd 128/128 w8 s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8,
                                   "fwd_num_stages": 3},
    }
    variants = {name: (lambda w, o=options: torch.compile(flex_fn(w, o), dynamic=False))
                for name, options in flex_options.items()}
    variants["flash-2 (aten) + sink fold"] = lambda w: (lambda q_, k_, v_, s_: sink_flash_attention(
        q_, k_, v_, s_, scaling=SCALE, sliding_window=w).transpose(1, 2))
    if args.autotune:  # on its own: its compilation takes minutes
        variants = {"flex max-autotune": lambda w: torch.compile(flex_fn(w, {}), dynamic=False,
                                                                 mode="max-autotune-no-cudagraphs")}

    print(f"{'variant':<28} {'window':>6} {'fwd ms':>7} {'fwd TF/s':>8} {'f+b ms':>7} {'f+b TF/s':>8} "
          f"{'compile s':>9} {'out err':>8} {'dq err':>8} {'dk err':>8} {'dv err':>8} {'dsink err':>9}", flush=True)
    for window in (None, 128):
        mask = attention.dense_mask(attention.make_mask_mod(None, None, window), BATCH, SEQ, SEQ, "cuda")
        leaves = [t.float().detach().requires_grad_() for t in (q, k, v, sinks)]
        ref = attention.sink_attention_reference(*leaves[:3], leaves[3], scaling=SCALE, mask=mask)  # [B, L, H, D]
        ref.transpose(1, 2).backward(grad.float())
        ref_out, ref_grads = ref.transpose(1, 2).detach(), [t.grad for t in leaves]
        del leaves, ref, mask
        for name, build in variants.items():
            try:
                started = time.perf_counter()
                fn = build(window)
                inputs = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
                out = fn(*inputs)
                out.backward(grad)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - started
                errors = [(out.float() - ref_out).norm() / ref_out.norm()]
                errors += [(t.grad.float() - r).norm() / r.norm() for t, r in zip(inputs, ref_grads)]

                def forward_only():
                    with torch.no_grad():
                        fn(q, k, v, sinks)

                def forward_backward():
                    for t in inputs:
                        t.grad = None
                    fn(*inputs).backward(grad)

                fwd, both = time_ms(forward_only), time_ms(forward_backward)
                print(f"{name:<28} {str(window):>6} {fwd:>7.3f} {attention_flops(window, False) / fwd / 1e9:>8.1f} "
                      f"{both:>7.3f} {attention_flops(window, True) / both / 1e9:>8.1f} {compile_s:>9.1f} "
                      + " ".join(f"{float(e):>8.2e}" for e in errors[:4]) + f" {float(errors[4]):>9.2e}", flush=True)
            except Exception as err:  # one variant failing must not lose the others' numbers
                print(f"{name:<28} {str(window):>6} FAILED {type(err).__name__}: {str(err).splitlines()[0][:160]}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
