"""MXFP4 -> bf16 decode of expert stacks on the GPU: one Triton pass, bytes in, interleaved values out.

The frozen experts are decoded in forward, in the recompute (gate_up only) and in backward, 1.6 GB of bf16 written
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
    def _decode_kernel(blocks_ptr, scales_ptr, out_ptr, slice_bytes, matrix_bytes, first_byte, BLOCK: tl.constexpr):
        # Program (i, e) decodes bytes [i*BLOCK, (i+1)*BLOCK) of matrix e's slice, which starts at first_byte of that
        # matrix (slice_bytes == matrix_bytes, first_byte == 0: the whole stack). No division on the hot path.
        pid = tl.program_id(0)
        matrix = tl.program_id(1).to(tl.int64)
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < slice_bytes
        source = matrix * matrix_bytes + first_byte + offsets
        byte = tl.load(blocks_ptr + source, mask=mask, other=0).to(tl.int32)
        scale_byte = tl.load(scales_ptr + source // 16, mask=mask, other=127).to(tl.int32)
        scale = (scale_byte << 23).to(tl.float32, bitcast=True)
        low = _e2m1(byte & 15) * scale
        high = _e2m1(byte >> 4) * scale
        values = tl.interleave(low, high)
        out_offsets = matrix * (2 * slice_bytes) + pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        in_slice = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK) < 2 * slice_bytes
        tl.store(out_ptr + out_offsets, values.to(out_ptr.dtype.element_ty), mask=in_slice)


def triton_available() -> bool:
    return triton is not None


def _launch_decode(blocks, scales, dtype, first_row: int, num_rows: int, launch) -> torch.Tensor:
    blocks, scales = blocks.contiguous(), scales.contiguous()
    rows, groups = blocks.shape[-3], blocks.shape[-2]
    matrices = blocks.numel() // (rows * groups * 16)
    out = torch.empty(*blocks.shape[:-3], num_rows, groups * 32, dtype=dtype, device=blocks.device)
    slice_bytes = num_rows * groups * 16
    launch(_decode_kernel)[(triton.cdiv(slice_bytes, DECODE_BLOCK), matrices)](
        blocks, scales, out, slice_bytes, rows * groups * 16, first_row * groups * 16, BLOCK=DECODE_BLOCK,
        num_warps=DECODE_WARPS)
    return out


# Bytes of MXFP4 blocks per program and warps per program (scripts/bench_decode_gpu.py measures alternatives).
DECODE_BLOCK, DECODE_WARPS = 2048, 8


# The kernel as a ``torch.library.triton_op``, registered at import (not inside a graph dynamo is tracing): a compiled
# decoder layer (kernels/layer.py) traces through it as one op instead of breaking its graph. None without Triton or
# triton_op.
_decode_op = None
if triton is not None and hasattr(torch.library, "triton_op"):

    @torch.library.triton_op("gptoss_train::decode_mxfp4_rows", mutates_args=())
    def _decode_op(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, first_row: int,
                   num_rows: int) -> torch.Tensor:
        return _launch_decode(blocks, scales, dtype, first_row, num_rows, torch.library.wrap_triton)


def decode_mxfp4_triton(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16,
                        rows: tuple[int, int] | None = None) -> torch.Tensor:
    """[..., R, G, 16] uint8 + [..., R, G] uint8 (CUDA) -> [..., R, G*32] ``dtype``; ``rows=(start, stop)`` decodes
    only that range of every matrix's rows -> [..., stop - start, G*32]."""
    first, stop = rows if rows is not None else (0, blocks.shape[-3])
    if _decode_op is not None:
        return _decode_op(blocks, scales, dtype, first, stop - first)
    return _launch_decode(blocks, scales, dtype, first, stop - first, lambda kernel: kernel)
