"""Fused Triton kernels for the gpt-oss decode step (one token per sequence), used inside the captured CUDA graph.

Why: at batch 1 the decode step is launch-bound. The eager step issues ~62 small kernels per layer (norm casts, RoPE,
cache index_put, the sink softmax pieces, the routing sort and its bookkeeping, bias/SwiGLU element-wise ops, the
un-sort and top-k sum); inside a CUDA graph each still costs 2-5 us, ~3.5 ms of a 7.2 ms step. With these kernels a
layer is 12 launches: QKV GEMM, `rope_kv_write`, `decode_attention`, O GEMM, `add_rms_norm`, router GEMM,
`route_sort`, a row gather, two grouped GEMMs, `bias_swiglu` and `moe_combine_add_rms_norm` (which also applies the
next layer's input norm, or the final norm).

Numerics follow gen_model's eager decode step: every place the eager path rounds to the activation dtype (bias adds,
the SwiGLU element-wise ops, score weighting, residual adds) is rounded here too, so the two paths differ only in
reduction order and in attention (an online softmax in fp32 here; eager rounds the normalised probabilities to bf16).
The eager step stays the reference and the fallback (CPU, prefill, shapes these kernels do not cover).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager decode step is used
    triton = None

# route_sort runs as one program over all (token, expert) pairs; past this many pairs the eager step is used.
MAX_FUSED_PAIRS = 512
# expert_gemm replaces torch's grouped GEMM in the fused step up to this many (token, expert) pairs (0: never).
# Measured on an H100 (one 20b layer's two expert products, bench_generate.py --gemm-bench): grouped_mm 118 / 252 /
# 599 / 636 us at 1 / 4 / 16 / 64 tokens; expert_gemm 90 / 208 / 506 / 562 us (1.7 -> 2.2 TB/s at one token).
EXPERT_GEMM_MAX_PAIRS = MAX_FUSED_PAIRS
# (BLOCK_N, BLOCK_K, stages); None: by size, (64, 128, 4) up to 8 rows (best at one token), else (128, 64, 4)
EXPERT_GEMM_TILES: tuple[int, int, int] | None = None
# expert_gemm_mxfp4 tiles, (BLOCK_N, BLOCK_K, stages); None: by size, the best measured on an H100 (one 20b layer):
# (32, 128, 3) up to 8 rows, 154 us at one token; else (32, 64, 4), 673 / 738 us at 16 / 64 tokens. All slower than
# the bf16 expert_gemm (90 / 506 / 562 us): the in-register decode, not the bytes, bounds it.
MXFP4_GEMM_TILES: tuple[int, int, int] | None = None
# decode attention reads a sequence's keys in chunks of this many, one program each (then a combine kernel)
ATTENTION_SPLIT_LEN = 256


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _rms_norm_row(x, w_ptr, cols, mask, n, eps, out_ptr, row_off):
        # GptOssRMSNorm: fp32 statistics, fp32 weight applied before the cast back.
        var = tl.sum(tl.where(mask, x * x, 0.0), axis=0) / n
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = x * (1.0 / tl.sqrt(var + eps)) * w
        tl.store(out_ptr + row_off + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, x_out_ptr, h_out_ptr, n, eps,
                             HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            d = tl.load(delta_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x + d).to(x_out_ptr.dtype.element_ty).to(tl.float32)  # the residual add rounds, as in eager
            tl.store(x_out_ptr + row * n + cols, x.to(x_out_ptr.dtype.element_ty), mask=mask)
        _rms_norm_row(x, w_ptr, cols, mask, n, eps, h_out_ptr, row * n)

    @triton.jit
    def _rope_kv_write_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                              cache_len, RING: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        d = tl.arange(0, D)
        half: tl.constexpr = D // 2
        rolled = (d + half) % D
        pos = tl.load(pos_ptr + b)
        cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        row = qkv_ptr + b * ((H + 2 * HKV) * D)
        x = tl.load(row + head * D + d).to(tl.float32)
        xr = tl.load(row + head * D + rolled).to(tl.float32)
        # eager: addcmul(x * cos2, roll(x), sin2): the first product rounds, the fused multiply-add rounds once.
        rot = ((x * cos).to(q_out_ptr.dtype.element_ty).to(tl.float32) + xr * sin).to(q_out_ptr.dtype.element_ty)
        if head < H:
            tl.store(q_out_ptr + (b * H + head) * D + d, rot)
        else:
            kvh = head - H
            slot_pos = pos
            if RING:
                slot_pos = pos % cache_len
            dst = ((b * HKV + kvh) * cache_len + slot_pos) * D + d
            tl.store(k_cache_ptr + dst, rot)
            v = tl.load(row + (H + HKV + kvh) * D + d)
            tl.store(v_cache_ptr + dst, v)

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, sinks_ptr, out_ptr, part_m_ptr,
                                 part_l_ptr, part_acc_ptr, cache_len, kv_len, splits, scale,
                                 SPLIT_LEN: tl.constexpr, ONE_SPLIT: tl.constexpr, G: tl.constexpr,
                                 GB: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr):
        # One program per (sequence, kv head, key split): its G query heads against keys [split * SPLIT_LEN, ...)
        # (those at index <= position), online softmax in fp32. The sink logit joins split 0's denominator. With
        # one split the output is final; otherwise (m, l, acc) go to scratch for _attention_combine_kernel.
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, GB)
        d = tl.arange(0, D)
        gmask = g < G
        heads = kvh * G + g
        q = tl.load(q_ptr + (b * (HKV * G) + heads[:, None]) * D + d[None, :], mask=gmask[:, None], other=0.0)
        pos = tl.load(pos_ptr + b)
        sink = tl.load(sinks_ptr + heads, mask=gmask, other=0.0).to(tl.float32)
        # finite "minus infinity" for splits without the sink: exp(m - m_new) stays 1 when nothing is valid yet
        m = tl.where(split == 0, sink, -1.0e30)
        l_sum = tl.where(split == 0, 1.0, 0.0) + tl.zeros([GB], tl.float32)
        acc = tl.zeros([GB, D], tl.float32)
        base = (b * HKV + kvh) * cache_len * D
        # kv_len and splits are run-time values: one compiled kernel serves every KV-length bucket
        for off in range(0, SPLIT_LEN, BLOCK_L):
            keys = split * SPLIT_LEN + off + tl.arange(0, BLOCK_L)
            valid = (keys < kv_len) & (keys <= pos)
            k = tl.load(k_cache_ptr + base + keys[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k))  # [GB, BLOCK_L] fp32
            # eager: q.K in the activation dtype, then the scale (a power of two: exact)
            s = s.to(q_ptr.dtype.element_ty).to(tl.float32) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            v = tl.load(v_cache_ptr + base + keys[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if ONE_SPLIT:
            out = acc / l_sum[:, None]
            tl.store(out_ptr + (b * (HKV * G) + heads[:, None]) * D + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
        else:
            part = ((b * HKV + kvh) * splits + split) * GB
            tl.store(part_m_ptr + part + g, m)
            tl.store(part_l_ptr + part + g, l_sum)
            tl.store(part_acc_ptr + (part + g[:, None]) * D + d[None, :], acc)

    @triton.jit
    def _attention_combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, splits,
                                  G: tl.constexpr, GB: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        g = tl.arange(0, GB)
        d = tl.arange(0, D)
        base = (b * HKV + kvh) * splits * GB
        m = tl.full([GB], -1.0e30, tl.float32)
        for sp in range(splits):
            m = tl.maximum(m, tl.load(part_m_ptr + base + sp * GB + g))
        l_sum = tl.zeros([GB], tl.float32)
        acc = tl.zeros([GB, D], tl.float32)
        for sp in range(splits):
            w = tl.exp(tl.load(part_m_ptr + base + sp * GB + g) - m)
            l_sum += w * tl.load(part_l_ptr + base + sp * GB + g)
            acc += w[:, None] * tl.load(part_acc_ptr + (base + sp * GB + g[:, None]) * D + d[None, :])
        out = acc / l_sum[:, None]
        heads = kvh * G + g
        tl.store(out_ptr + (b * (HKV * G) + heads[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(g < G)[:, None])

    @triton.jit
    def _route_sort_kernel(logits_ptr, n_tokens, flat_e_ptr, flat_w_ptr, denom_ptr, scores_ptr, order_ptr,
                           expert_ptr, token_ptr, inv_ptr, offs_ptr, E: tl.constexpr, EB: tl.constexpr,
                           K: tl.constexpr, TB: tl.constexpr, PB: tl.constexpr, CHUNK: tl.constexpr):
        # Phase 1: top-k per token (largest first, lowest index on ties) and the softmax over the k logits.
        t = tl.arange(0, TB)
        e = tl.arange(0, EB)
        tmask = t < n_tokens
        x = tl.load(logits_ptr + t[:, None] * E + e[None, :], mask=tmask[:, None] & (e[None, :] < E),
                    other=float("-inf")).to(tl.float32)
        top = tl.max(x, axis=1)
        denom = tl.zeros([TB], tl.float32)
        for j in tl.static_range(K):
            m = tl.max(x, axis=1)
            idx = tl.min(tl.where(x == m[:, None], e[None, :], EB), axis=1)
            w = tl.exp(m - top)
            denom += w
            tl.store(flat_e_ptr + t * K + j, idx, mask=tmask)
            tl.store(flat_w_ptr + t * K + j, w, mask=tmask)
            x = tl.where(e[None, :] == idx[:, None], float("-inf"), x)
        tl.store(denom_ptr + t, denom, mask=tmask)
        tl.debug_barrier()
        # Phase 2: stable counting sort of the pairs by expert (rank = pairs before it in (expert, index) order).
        n_pairs = n_tokens * K
        i = tl.arange(0, PB)
        imask = i < n_pairs
        ei = tl.load(flat_e_ptr + i, mask=imask, other=EB)
        rank = tl.zeros([PB], tl.int32)
        upto = tl.zeros([EB], tl.int32)
        for c0 in range(0, PB, CHUNK):
            other = c0 + tl.arange(0, CHUNK)  # (not `j`: the top-k loop's constexpr name would clash)
            ej = tl.load(flat_e_ptr + other, mask=other < n_pairs, other=EB)
            before = (ej[:, None] < ei[None, :]) | ((ej[:, None] == ei[None, :]) & (other[:, None] < i[None, :]))
            rank += tl.sum(before.to(tl.int32), axis=0)
            upto += tl.sum((ej[:, None] <= e[None, :]).to(tl.int32), axis=0)
        tl.store(offs_ptr + e, upto, mask=e < E)
        w = tl.load(flat_w_ptr + i, mask=imask, other=0.0)
        den = tl.load(denom_ptr + i // K, mask=imask, other=1.0)
        # the router softmax runs in the activation dtype in transformers: its output rounds
        score = (w / den).to(scores_ptr.dtype.element_ty)
        tl.store(scores_ptr + rank, score, mask=imask)
        tl.store(order_ptr + rank, i.to(order_ptr.dtype.element_ty), mask=imask)
        tl.store(expert_ptr + rank, ei.to(expert_ptr.dtype.element_ty), mask=imask)
        tl.store(token_ptr + rank, (i // K).to(token_ptr.dtype.element_ty), mask=imask)
        tl.store(inv_ptr + i, rank.to(inv_ptr.dtype.element_ty), mask=imask)

    @triton.jit
    def _bias_swiglu_kernel(gate_up_ptr, bias_ptr, expert_ptr, out_ptr, inter, alpha, limit, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        ex = tl.load(expert_ptr + row).to(tl.int64)
        dt = out_ptr.dtype.element_ty
        # rows interleave gate (even) and up (odd); every eager op rounds to the activation dtype
        gate = tl.load(gate_up_ptr + row * 2 * inter + 2 * cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * inter + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
        gate = (gate + tl.load(bias_ptr + ex * 2 * inter + 2 * cols, mask=mask, other=0.0).to(tl.float32))
        up = (up + tl.load(bias_ptr + ex * 2 * inter + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32))
        gate = tl.minimum(gate.to(dt).to(tl.float32), limit)
        up = tl.minimum(tl.maximum(up.to(dt).to(tl.float32), -limit), limit)
        sig = tl.sigmoid((gate * alpha).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        glu = (gate * sig).to(dt).to(tl.float32)
        out = ((up + 1.0).to(dt).to(tl.float32) * glu).to(dt)
        tl.store(out_ptr + row * inter + cols, out, mask=mask)

    @triton.jit
    def _moe_combine_kernel(x_ptr, pairs_ptr, bias_ptr, expert_ptr, scores_ptr, inv_ptr, w_ptr, x_out_ptr,
                            h_out_ptr, n, eps, K: tl.constexpr, BLOCK: tl.constexpr):
        # One token: sum_k score * (expert output + bias) in fp32, residual add, then the next RMSNorm.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        dt = x_out_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(K):
            r = tl.load(inv_ptr + row * K + j).to(tl.int64)
            ex = tl.load(expert_ptr + r).to(tl.int64)
            s = tl.load(scores_ptr + r).to(tl.float32)
            y = tl.load(pairs_ptr + r * n + cols, mask=mask, other=0.0).to(tl.float32)
            y = (y + tl.load(bias_ptr + ex * n + cols, mask=mask, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
            acc += (y * s).to(dt).to(tl.float32)
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + acc.to(dt).to(tl.float32)).to(dt).to(tl.float32)
        tl.store(x_out_ptr + row * n + cols, x.to(dt), mask=mask)
        _rms_norm_row(x, w_ptr, cols, mask, n, eps, h_out_ptr, row * n)


    @triton.jit
    def _expert_gemm_kernel(x_ptr, x_rows_ptr, w_ptr, offs_ptr, out_ptr, K: tl.constexpr, N: tl.constexpr,
                            GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        # One program per (expert, column block): the expert's rows (sorted, offs = cumulative counts) times
        # w[e][:, block], the weight tile streamed once per 16-row tile. Experts with no rows return at once.
        e = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(offs_ptr + e)
        w_base = w_ptr + e.to(tl.int64) * K * N
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < end
            src = rows.to(tl.int64)
            if GATHER:  # row r of the product reads x row x_rows[r] (the routed token): no gathered copy of x
                src = tl.load(x_rows_ptr + rows, mask=rmask, other=0).to(tl.int64)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                kmask = kk < K
                xt = tl.load(x_ptr + src[:, None] * K + kk[None, :],
                             mask=rmask[:, None] & kmask[None, :], other=0.0)
                wt = tl.load(w_base + kk[:, None] * N + n[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc += tl.dot(xt, wt)
            tl.store(out_ptr + rows[:, None].to(tl.int64) * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])


    # E2M1 nibble -> float32, shared with the training path's decode kernel (one definition of the bit layout)
    from gptoss_train.kernels.mxfp4_decode import _e2m1  # noqa: E402

    @triton.jit
    def _expert_gemm_mxfp4_kernel(x_ptr, x_rows_ptr, blocks_ptr, scales_ptr, offs_ptr, out_ptr, K: tl.constexpr,
                                  N: tl.constexpr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # expert_gemm reading the checkpoint's MXFP4 bytes (HF layout: blocks [E, N, K/32, 16], scales [E, N, K/32]):
        # each weight tile is decoded in registers (exact in bf16) and never written out: 0.53 bytes a weight.
        e = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(offs_ptr + e)
        wrow = e.to(tl.int64) * N + n  # [BLOCK_N] weight rows (output features)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < end
            src = rows.to(tl.int64)
            if GATHER:
                src = tl.load(x_rows_ptr + rows, mask=rmask, other=0).to(tl.int64)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                # (Measured on the H100: faster than feeding the low/high nibbles to two half-width dots against the
                # even/odd columns of x, which avoids this interleave: 154 vs 184 us at one token.)
                kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                byte = tl.load(blocks_ptr + wrow[:, None] * (K // 2) + kb[None, :],
                               mask=nmask[:, None] & (kb[None, :] < K // 2), other=0).to(tl.int32)
                sbyte = tl.load(scales_ptr + wrow[:, None] * (K // 32) + ks[None, :],
                                mask=nmask[:, None] & (ks[None, :] < K // 32), other=127).to(tl.int32)
                scale = (sbyte << 23).to(tl.float32, bitcast=True)
                vals = tl.interleave(_e2m1(byte & 15), _e2m1(byte >> 4))  # [BLOCK_N, BLOCK_K], even = low nibble
                vals = tl.reshape(vals, [BLOCK_N, BLOCK_K // 32, 32]) * scale[:, :, None]
                w = tl.reshape(vals, [BLOCK_N, BLOCK_K]).to(x_ptr.dtype.element_ty)
                kk = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_ptr + src[:, None] * K + kk[None, :], mask=rmask[:, None] & (kk[None, :] < K),
                             other=0.0)
                acc += tl.dot(xt, tl.trans(w))
            tl.store(out_ptr + rows[:, None].to(tl.int64) * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + delta, rms_norm(x + delta)) for rows of x [T, n]; with delta None, (x, rms_norm(x))."""
    t, n = x.shape
    h = torch.empty_like(x)
    x_out = torch.empty_like(x) if delta is not None else x
    _add_rms_norm_kernel[(t,)](x, delta if delta is not None else x, weight, x_out, h, n, eps,
                               HAS_DELTA=delta is not None, BLOCK=_pow2(n), num_warps=8)
    return x_out, h


def rope_kv_write(qkv: Tensor, positions: Tensor, cos2: Tensor, sin2: Tensor, k_cache: Tensor, v_cache: Tensor,
                  num_heads: int, ring: bool) -> Tensor:
    """Rotate q and k of qkv [B, (H + 2 Hkv) * D]; write k, v into the cache rows of slots 0..B-1 at their
    positions (modulo the ring length for sliding layers); return q [B, H, D]."""
    batch = qkv.shape[0]
    _, kv_heads, cache_len, head_dim = k_cache.shape
    q = torch.empty(batch, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_kv_write_kernel[(batch, num_heads + kv_heads)](
        qkv, positions, cos2, sin2, q, k_cache, v_cache, cache_len, RING=ring, H=num_heads, HKV=kv_heads, D=head_dim,
        num_warps=1,
    )
    return q


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, sinks: Tensor, scale: float,
                     kv_len: int) -> Tensor:
    """q [B, H, D] against cache rows 0..kv_len-1 of slots 0..B-1 (keys at index <= position); [B, H * D].

    Keys are split into ATTENTION_SPLIT_LEN chunks over separate programs (flash-decoding) so that one sequence's
    long cache is read by many SMs at once, then combined."""
    batch, heads, head_dim = q.shape
    _, kv_heads, cache_len, _ = k_cache.shape
    groups = heads // kv_heads
    gb = max(16, _pow2(groups))
    split_len = min(_pow2(kv_len), ATTENTION_SPLIT_LEN)
    splits = triton.cdiv(kv_len, split_len)
    out = torch.empty(batch, heads * head_dim, dtype=q.dtype, device=q.device)
    part_m = part_l = part_acc = out  # unused with one split
    if splits > 1:
        part_m = torch.empty(batch, kv_heads, splits, gb, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(batch, kv_heads, splits, gb, head_dim, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, positions, sinks, out, part_m, part_l, part_acc, cache_len, kv_len, splits, scale,
        SPLIT_LEN=split_len, ONE_SPLIT=splits == 1, G=groups, GB=gb, HKV=kv_heads, D=head_dim,
        BLOCK_L=min(64, split_len), num_warps=4,
    )
    if splits > 1:
        _attention_combine_kernel[(batch, kv_heads)](part_m, part_l, part_acc, out, splits, G=groups, GB=gb,
                                                     HKV=kv_heads, D=head_dim, num_warps=4)
    return out


def route_sort(logits: Tensor, top_k: int, dtype: torch.dtype):
    """gen_model.route in one launch: (scores of sorted pairs, order, expert of each sorted pair, token of each
    sorted pair, cumulative pair counts per expert [E] int32) plus inv (sorted row of each token's j-th pair)."""
    tokens, experts = logits.shape
    pairs = tokens * top_k
    dev = logits.device
    flat_e = torch.empty(pairs, dtype=torch.int32, device=dev)
    flat_w = torch.empty(pairs, dtype=torch.float32, device=dev)
    denom = torch.empty(tokens, dtype=torch.float32, device=dev)
    scores = torch.empty(pairs, dtype=dtype, device=dev)
    order = torch.empty(pairs, dtype=torch.long, device=dev)
    expert = torch.empty(pairs, dtype=torch.long, device=dev)
    token = torch.empty(pairs, dtype=torch.long, device=dev)
    inv = torch.empty(pairs, dtype=torch.long, device=dev)
    offs = torch.empty(experts, dtype=torch.int32, device=dev)
    pb = max(16, _pow2(pairs))
    _route_sort_kernel[(1,)](
        logits, tokens, flat_e, flat_w, denom, scores, order, expert, token, inv, offs, E=experts,
        EB=max(16, _pow2(experts)), K=top_k, TB=max(16, _pow2(tokens)), PB=pb, CHUNK=min(pb, 32), num_warps=4,
    )
    return scores, order, expert, token, offs, inv


def bias_swiglu(gate_up: Tensor, bias: Tensor, expert_of_row: Tensor, alpha: float, limit: float) -> Tensor:
    rows, two_inter = gate_up.shape
    inter = two_inter // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _bias_swiglu_kernel[(rows, triton.cdiv(inter, block))](
        gate_up, bias, expert_of_row, out, inter, alpha, limit, BLOCK=block, num_warps=4)
    return out


def moe_combine_add_rms_norm(x: Tensor, pairs: Tensor, bias: Tensor, expert_of_row: Tensor, scores: Tensor,
                             inv: Tensor, weight: Tensor, eps: float, top_k: int) -> tuple[Tensor, Tensor]:
    """x + sum_k score * (pair output + bias) per token, and its RMSNorm."""
    t, n = x.shape
    x_out, h = torch.empty_like(x), torch.empty_like(x)
    _moe_combine_kernel[(t,)](x, pairs, bias, expert_of_row, scores, inv, weight, x_out, h, n, eps, K=top_k,
                              BLOCK=_pow2(n), num_warps=8)
    return x_out, h


def expert_gemm(x: Tensor, weight: Tensor, offs: Tensor, x_rows: Tensor | None = None) -> Tensor:
    """grouped_mm(x, weight, offs) for few rows: x [P, K] sorted by expert, weight [E, K, N], offs [E] cumulative;
    with x_rows [P], row r reads x[x_rows[r]] instead (x [T, K] unsorted, e.g. the tokens of the sorted pairs).

    At decode batch sizes (1-4 rows per expert) torch's grouped GEMM streams the selected experts at ~1.9 TB/s;
    this kernel spreads each expert's columns over many programs (BLOCK_N wide) so the weight reads fill the card."""
    rows = x.shape[0] if x_rows is None else x_rows.shape[0]
    k = x.shape[1]
    experts, _, n = weight.shape
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block_n, block_k, stages = EXPERT_GEMM_TILES or ((64, 128, 4) if rows <= 8 else (128, 64, 4))
    _expert_gemm_kernel[(experts, triton.cdiv(n, block_n))](
        x, x if x_rows is None else x_rows, weight, offs, out, K=k, N=n, GATHER=x_rows is not None, BLOCK_M=16,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=stages,
    )
    return out


def expert_gemm_mxfp4(x: Tensor, blocks: Tensor, scales: Tensor, offs: Tensor, x_rows: Tensor | None = None) -> Tensor:
    """expert_gemm with the weight as MXFP4 bytes in the checkpoint layout: blocks [E, N, K/32, 16] uint8 and
    scales [E, N, K/32] uint8 (N output features, K input features); same result as decoding to bf16 first."""
    rows = x.shape[0] if x_rows is None else x_rows.shape[0]
    experts, n, groups, _ = blocks.shape
    k = groups * 32
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block_n, block_k, stages = MXFP4_GEMM_TILES or ((32, 128, 3) if rows <= 8 else (32, 64, 4))
    _expert_gemm_mxfp4_kernel[(experts, triton.cdiv(n, block_n))](
        x, x if x_rows is None else x_rows, blocks, scales, offs, out, K=k, N=n, GATHER=x_rows is not None,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=stages,
    )
    return out
