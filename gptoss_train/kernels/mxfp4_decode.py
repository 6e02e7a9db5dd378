"""MXFP4 -> bf16 decode of expert stacks on the GPU: one Triton pass, bytes in, interleaved values out.

The frozen experts are decoded 3 times per layer and step (forward, recompute, backward), 1.6 GB of bf16 written
each time at 20b shapes. The inductor-fused version of the table decode reached ~1 TB/s (1.05 ms a matrix in the
first profile); this kernel computes the E2M1 values arithmetically from the nibble bits and the scale from the
E8M0 byte as float bits, so it is a pure stream: read 17 bytes, write 64.
Format (formats.md §2.2): byte j of a 16-byte block holds element 2j (low nibble) and 2j+1 (high nibble);
code: bit3 sign, bits2-1 exponent (bias 1), bit0 mantissa; value = code value * 2^(scale_byte - 127).
Scale byte 0 (2^-127, a denormal) decodes to 0 here, as with any flush-to-zero arithmetic; real checkpoints'
expert scales are far above it.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use the torch decode
    triton = None


if triton is not None:

    @triton.jit
    def _e2m1(code):
        magnitude = code & 7
        exponent = magnitude >> 1
        mantissa = (magnitude & 1).to(tl.float32)
        # normal: (1 + m/2) * 2^(e-1); subnormal (e == 0): m/2
        power = ((exponent + 126) << 23).to(tl.float32, bitcast=True)
        value = tl.where(exponent == 0, mantissa * 0.5, (1.0 + mantissa * 0.5) * power)
        return tl.where((code & 8) != 0, -value, value)

    @triton.jit
    def _decode_kernel(blocks_ptr, scales_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_bytes
        byte = tl.load(blocks_ptr + offsets, mask=mask, other=0).to(tl.int32)
        scale_byte = tl.load(scales_ptr + offsets // 16, mask=mask, other=127).to(tl.int32)
        scale = (scale_byte << 23).to(tl.float32, bitcast=True)
        low = _e2m1(byte & 15) * scale
        high = _e2m1(byte >> 4) * scale
        values = tl.interleave(low, high)
        out_offsets = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_offsets, values.to(out_ptr.dtype.element_ty), mask=out_offsets < 2 * n_bytes)


def triton_available() -> bool:
    return triton is not None


def decode_mxfp4_triton(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """[..., G, 16] uint8 + [..., G] uint8 (CUDA, contiguous) -> [..., G*32] ``dtype``."""
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty(*blocks.shape[:-2], blocks.shape[-2] * 32, dtype=dtype, device=blocks.device)
    n_bytes = blocks.numel()
    block = 2048
    _decode_kernel[(triton.cdiv(n_bytes, block),)](blocks, scales, out, n_bytes, BLOCK=block, num_warps=8)
    return out
