"""MXFP4 codec for gpt-oss expert weights (HF checkpoint layout).

Layout (formats.md §0, §2): ``blocks`` uint8 ``[..., G, 16]`` and ``scales`` uint8 ``[..., G]``; each 32-element block
runs along the last (input) dimension; byte ``j`` of a block holds element ``2j`` in its low nibble and ``2j + 1`` in
its high nibble; a nibble is an E2M1 code (bit 3 = sign) and ``value = LUT[code] * 2**(scale - 127)``.

Why our own codec: transformers only decodes (and its encoder needs the hub ``triton_kernels`` package, absent on CPU);
gguf-py encodes with a float ``log2`` that is wrong a few ulps below powers of two and drops the sign of zeros. Here:

* decode is bit-identical to ``transformers.integrations.mxfp4._convert_moe_packed_tensors`` (tested), through one
  65,536-entry table indexed by ``(scale << 8) | byte`` that yields both decoded elements of a byte at once;
* encode follows DESIGN.md §1 decision 3: the block exponent comes exactly from the float32 bits of the block's
  largest magnitude; elements are rounded half-to-even onto the E2M1 grid and saturate at ±6; zeros keep their sign;
  an all-zero block gets scale byte 0. Scale rules:

  - ``ocp``: ``floor(log2 amax) - 2`` (OCP MX v1.0, llama.cpp, gguf-py). Values in (6, 8)·2^s clip to 6·2^s.
  - ``noclip``: ``ceil(log2(amax / 6))`` (triton_kernels ROUND_UP, transformers, ModelOpt). Never clips.
  - ``best`` (default): per block, whichever of the two gives the smaller squared error (ties go to ``ocp``, whose
    output is canonical and so byte-stable under decode → encode).

  The two rules only differ when ``amax / 2**floor(log2 amax) > 1.5`` (the floor rule would clip); then the ``noclip``
  exponent is one larger. ``keep_scales`` re-encodes blocks that came from MXFP4 (a tuned expert) at their original
  scale unless a new value would round beyond ±6 at that scale (|v| >= 7·2^s); only those blocks get a new scale.
  Re-choosing every scale from the new amax is unstable (DESIGN.md §1.3).

Three implementations give the same bits (tested): ``eager`` (vectorised torch, processed in chunks of
``chunk_elements`` so the extra memory is bounded whatever the tensor size; the reference), ``compiled`` (the same
arithmetic through torch.compile: triton on CUDA, inductor C++ on CPU) and ``native`` (a small C kernel, CPU only,
built on first use with the system compiler and run on torch's thread count: ``mxfp4_native``). ``kernel=None`` picks
native on CPU when it builds, compiled for large CUDA tensors, eager otherwise; ``GPTOSS_MXFP4_KERNEL`` sets the
default. Why native on CPU: for all 20b experts (19.1 G weights, 2-core CPU, ``scripts/bench_mxfp4.py``) eager +
inductor took ~106 s of CPU time, the native kernel ~37 s, over half of it the operating system zeroing the fresh
pages of ~50 GB of outputs (~23 s with ``out=`` buffers reused).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from gptoss_train.quant import mxfp4_native

BLOCK_SIZE = 32
BYTES_PER_BLOCK = BLOCK_SIZE // 2
SCALE_BIAS = 127
# E2M1 code -> value; code 8 is -0.0 (formats.md §2.1).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
RULES = ("best", "ocp", "noclip")
KERNELS = ("eager", "compiled", "native")

# A value rounds beyond ±6 (would need code "8.0") once |y| >= 7: the midpoint between 6 and the next grid point 8.
_KEEP_SCALE_LIMIT = 7.0

_DEFAULT_CHUNK_CPU = 1 << 20
_DEFAULT_CHUNK_CUDA = 1 << 27
# Tensors at least this big go through torch.compile'd kernels (one fused pass instead of ~15 eager ones: ~10x on
# CPU); below it the one-off compile (10-40 s) does not pay. GPTOSS_MXFP4_COMPILE=0 turns it off, =1 forces it.
_COMPILE_MIN_ELEMENTS = 1 << 26
_compile_failed: set[str] = set()
# blocks per native call: 1M elements, a few MB in and out, and enough calls to balance the threads
_NATIVE_CHUNK_BLOCKS = 1 << 15


class MXFP4Error(ValueError):
    """Bad input to the MXFP4 codec (shape, dtype, non-finite values)."""


def _default_chunk(device: torch.device) -> int:
    return _DEFAULT_CHUNK_CUDA if device.type == "cuda" else _DEFAULT_CHUNK_CPU


@functools.lru_cache(maxsize=None)
def _pair_table(dtype: torch.dtype, device_str: str) -> torch.Tensor:
    """Table indexed by ``(scale << 8) | byte`` giving both decoded elements of the byte as one packed integer.

    Entries are the exact products ``LUT[code] * 2**(s-127)`` (float64, where every one is exact, 2**128 for the
    byte 255 included) rounded once to ``dtype``, which is what transformers' ``torch.ldexp`` decode computes; a
    gather therefore reproduces it bit for bit (0.5 * 2**128 is finite, 1.0 * 2**128 overflows to inf).
    """
    lut = torch.tensor(FP4_VALUES, dtype=torch.float64)
    scale = torch.tensor([math.ldexp(1.0, s - SCALE_BIAS) for s in range(256)], dtype=torch.float64)
    byte = torch.arange(256)
    lo = lut[byte & 0x0F]
    hi = lut[byte >> 4]
    pairs = torch.stack([lo, hi], dim=-1)  # [256 bytes, 2]
    values = (scale[:, None, None] * pairs[None]).to(torch.float32).to(dtype)  # [256 scales, 256 bytes, 2]
    pair_int = {2: torch.int32, 4: torch.int64}[dtype.itemsize]
    return values.reshape(65536, 2).view(pair_int).reshape(65536).contiguous().to(device_str)


def _check_codes(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise MXFP4Error(f"blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise MXFP4Error(f"blocks must have shape [..., G, {BYTES_PER_BLOCK}], got {tuple(blocks.shape)}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise MXFP4Error(
            f"scales shape {tuple(scales.shape)} does not match blocks {tuple(blocks.shape)} (expected blocks[..., :-1])"
        )


def decode(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    *,
    dtype: torch.dtype = torch.bfloat16,
    transpose: bool = False,
    chunk_elements: int | None = None,
    kernel: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize ``blocks [..., G, 16]`` + ``scales [..., G]`` to ``[..., G*32]`` (HF ``[E, out, in]``).

    ``transpose=True`` swaps the last two dimensions (``[E, in, out]``: transformers' dense ``GptOssExperts`` layout,
    ``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]``). Any float ``dtype``; bfloat16/float16/float32 go through
    a packed-pair table (2 output elements per gather), others are decoded in float32 and cast. ``kernel``: one of
    ``KERNELS`` (same bits; None = native on CPU, compiled for large CUDA inputs, see ``_COMPILE_MIN_ELEMENTS``).
    ``out``: a contiguous tensor of the result's shape and dtype to write into (and return) instead of a new one:
    a loop over layers then reuses its memory; on CPU, faulting in fresh pages costs more than decoding into them.
    """
    _check_codes(blocks, scales)
    if not dtype.is_floating_point:
        raise MXFP4Error(f"decode dtype must be floating point, got {dtype}")
    if transpose and blocks.dim() < 3:
        raise MXFP4Error("transpose=True needs blocks of a matrix: [..., rows, G, 16]")
    table_dtype = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    table = _pair_table(table_dtype, str(blocks.device))
    *prefix, groups, _ = blocks.shape
    cols = groups * BLOCK_SIZE
    shape = (*prefix[:-1], cols, prefix[-1]) if transpose else (*prefix, cols)
    result = _output_buffer(out, "out", shape, dtype, blocks.device)
    if result.numel() == 0:
        return result

    chunk = chunk_elements or _default_chunk(blocks.device)
    rows_total = math.prod(prefix)
    rows_per_chunk = max(1, chunk // cols)
    # on CPU the eager pair-table gather is already faster than inductor's code: compile decode for CUDA only
    kernel = _pick_kernel(kernel, blocks.device, rows_total * cols, compile_on_cpu=False)
    native = _native_library(blocks.device) if kernel == "native" and table_dtype == dtype else None
    compiled = kernel == "compiled" and table_dtype == dtype
    if native is not None:
        return _decode_native(native, blocks, scales, table, result, transpose, _native_blocks_per_call(chunk_elements))
    if transpose:
        rows_per_chunk = min(rows_per_chunk, prefix[-1])
    flat_blocks = blocks.reshape(rows_total, groups, BYTES_PER_BLOCK)
    flat_scales = scales.reshape(rows_total, groups)
    if transpose:
        # [matrices, in, out]: rows of one matrix are written as columns of the result.
        rows_per_matrix = prefix[-1]
        out_t = result.view(math.prod(prefix[:-1]), cols, rows_per_matrix)
    else:
        flat_out = result.view(rows_total, cols)
    r0 = 0
    while r0 < rows_total:
        r1 = min(r0 + rows_per_chunk, rows_total)
        if transpose:
            # keep a chunk inside one matrix so its transpose is a plain strided copy
            m, local = divmod(r0, rows_per_matrix)
            r1 = min(r1, (m + 1) * rows_per_matrix)
        decoded = None
        if compiled and r1 - r0 == rows_per_chunk:
            decoded = _run_compiled("decode", _compiled_decoder(dtype), flat_blocks[r0:r1], flat_scales[r0:r1])
            if decoded is not None:
                decoded = decoded.view(r1 - r0, cols)
        if decoded is None:
            index = (flat_scales[r0:r1].to(torch.int32) << 8).unsqueeze(-1) | flat_blocks[r0:r1].to(torch.int32)
            gathered = torch.index_select(table, 0, index.reshape(-1))
            decoded = gathered.view(table_dtype).view(r1 - r0, cols)
        if transpose:
            out_t[m, :, local : local + (r1 - r0)].copy_(decoded.t())
        else:
            flat_out[r0:r1].copy_(decoded)
        r0 = r1
    return result


def _output_buffer(out: torch.Tensor | None, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """``out`` checked against the result it has to hold, or a new tensor (large new CPU ones on huge pages)."""
    if out is None:
        fresh = torch.empty(shape, dtype=dtype, device=device)
        if device.type == "cpu":
            mxfp4_native.advise_huge_pages(fresh)
        return fresh
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise MXFP4Error(
            f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got a"
            f"{'' if out.is_contiguous() else ' non-contiguous'} {out.dtype} tensor of shape {tuple(out.shape)} on {out.device}"
        )
    return out


def _pick_kernel(requested: str | None, device: torch.device, numel: int, *, compile_on_cpu: bool) -> str:
    # GPTOSS_MXFP4_KERNEL=eager|compiled|native sets the default (debugging, and the tests run every path through it);
    # a default of native does not apply where native cannot run (CUDA tensors)
    if requested is None:
        requested = os.environ.get("GPTOSS_MXFP4_KERNEL") or None
        if requested == "native" and _native_library(device) is None:
            requested = None
    if requested is not None:
        if requested not in KERNELS:
            raise MXFP4Error(f"unknown MXFP4 kernel {requested!r}; choose one of {', '.join(KERNELS)}")
        if requested == "native" and _native_library(device) is None:
            raise MXFP4Error(
                "the native MXFP4 kernel is unavailable (CPU tensors only, needs a C compiler; GPTOSS_MXFP4_NATIVE=0 turns"
                " it off): pass kernel=None to fall back automatically"
            )
        return requested
    if os.environ.get("GPTOSS_MXFP4_COMPILE", "") == "1":
        return "compiled"
    if _native_library(device) is not None:
        return "native"
    if (device.type == "cuda" or compile_on_cpu) and _use_compiled(None, numel):
        return "compiled"
    return "eager"


def _native_blocks_per_call(chunk_elements: int | None) -> int:
    return max(1, chunk_elements // BLOCK_SIZE) if chunk_elements else _NATIVE_CHUNK_BLOCKS


def _native_library(device: torch.device):
    if device.type != "cpu" or sys.byteorder != "little":  # the kernel reads bf16 pairs as little-endian words
        return None
    return mxfp4_native.load()


def _in_threads(n_items: int, per_call: int, work) -> None:
    """``work(start, stop)`` over ``[0, n_items)`` in pieces, on torch's intra-op thread count.

    Python threads rather than OpenMP: the native calls release the GIL, and threads that pull pieces from a shared
    counter keep both cores busy when one of them also serves another process (a static split waits for the slower).
    One future per thread, not per piece: thousands of futures set off Python's cyclic GC (7% of a profile)."""
    pieces = [(start, min(start + per_call, n_items)) for start in range(0, n_items, per_call)]
    threads = min(torch.get_num_threads(), len(pieces))
    next_piece = itertools.count()  # next() on it is atomic under the GIL

    def worker() -> None:
        for index in iter(lambda: next(next_piece), None):
            if index >= len(pieces):
                return
            work(*pieces[index])

    if threads <= 1:
        worker()
        return
    with ThreadPoolExecutor(threads - 1, thread_name_prefix="mxfp4") as pool:
        helpers = [pool.submit(worker) for _ in range(threads - 1)]
        worker()  # the calling thread takes pieces too
        for helper in helpers:
            helper.result()


def _decode_native(library, blocks: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, result: torch.Tensor,
                   transpose: bool, blocks_per_call: int) -> torch.Tensor:
    """Decode through the C kernel: every byte becomes its table entry (both elements) in one pass."""
    *prefix, groups, _ = blocks.shape
    cols = groups * BLOCK_SIZE
    flat_blocks = blocks.reshape(-1, BYTES_PER_BLOCK).contiguous()
    flat_scales = scales.reshape(-1).contiguous()
    decode_pairs = library.mxfp4_decode_u32 if table.element_size() == 4 else library.mxfp4_decode_u64

    def run(target: torch.Tensor, first_block: int, n_blocks: int) -> None:
        def work(start: int, stop: int) -> None:
            decode_pairs(flat_blocks[first_block + start].data_ptr(), flat_scales[first_block + start].data_ptr(),
                         table.data_ptr(), target.data_ptr() + start * BLOCK_SIZE * target.element_size(), stop - start)

        _in_threads(n_blocks, blocks_per_call, work)

    if not transpose:
        run(result, 0, flat_scales.numel())
        return result
    # [matrices, in, out]: decode one matrix at a time, then write it transposed
    rows = prefix[-1]
    matrices = math.prod(prefix[:-1])
    out_t = result.view(matrices, cols, rows)
    staging = torch.empty(rows, cols, dtype=result.dtype, device=blocks.device)
    for m in range(matrices):
        run(staging, m * rows * groups, rows * groups)
        out_t[m].copy_(staging.t())
    return result


@functools.lru_cache(maxsize=None)
def _inverse_scales(device_str: str) -> torch.Tensor:
    # 2**-(s) for s in [-127, 127] (index s + 127); all exactly representable in float32 (2**-127 is subnormal).
    return torch.tensor([math.ldexp(1.0, -(s - SCALE_BIAS)) for s in range(255)], dtype=torch.float32).to(device_str)


@functools.lru_cache(maxsize=None)
def _magnitudes(device_str: str) -> torch.Tensor:
    return torch.tensor(FP4_VALUES[:8], dtype=torch.float64).to(device_str)


def _block_exponents(amax_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (floor, ceil) rule scale bytes from the float32 bits of each block's amax (int32)."""
    exponent = (amax_bits >> 23) - 127  # floor(log2 amax) for normals; -127 for zero and subnormals
    mantissa = amax_bits & 0x7FFFFF
    floor_rule = (exponent - 2).clamp_(-127, 127) + SCALE_BIAS
    # ceil(log2(amax/6)) is one larger exactly when amax / 2**floor(log2 amax) > 1.5 (floor rule would clip).
    ceil_rule = (exponent - 2 + (mantissa > 0x400000).to(torch.int32)).clamp_(-127, 127) + SCALE_BIAS
    return floor_rule, ceil_rule


def _round_to_grid(y: torch.Tensor, *, with_values: bool = False):
    """E2M1 magnitude codes (int32, 0..7) of scaled magnitudes ``y >= 0`` (RNE, saturating at 6). ``y`` is consumed.

    The E2M1 grid has step 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6], so with ``e = clamp(floor(log2 y), 0, 2)``
    (read from the float32 exponent bits) the code is ``round(y * 2**(1-e)) + 2e``; ``torch.round`` is
    half-to-even, which is exactly RNE onto the grid (0.25 -> 0, 0.75 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
    Arithmetic instead of a ``bucketize`` over the midpoints: 3x faster on CPU. ``with_values`` also returns the
    rounded magnitudes (float32, exact).
    """
    y.clamp_(max=6.0)
    biased_exp = (y.view(torch.int32) >> 23).clamp_(127, 129)
    step_inverse = ((255 - biased_exp) << 23).view(torch.float32)  # 2**(1 - e), exact
    steps = y.mul_(step_inverse).round_()
    codes = steps.to(torch.int32).add_((biased_exp - 127) << 1)
    if with_values:
        return codes, steps.div_(step_inverse)
    return codes


def _scaled(magnitude: torch.Tensor, scale_bytes: torch.Tensor, device_str: str) -> torch.Tensor:
    # |x| * 2**-s: exact (a power of two), so rounding happens once, on the E2M1 grid
    return magnitude * _inverse_scales(device_str)[scale_bytes.long()].unsqueeze(-1)


def encode(
    x: torch.Tensor,
    *,
    rule: str = "best",
    keep_scales: torch.Tensor | None = None,
    chunk_elements: int | None = None,
    kernel: str | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., K]`` (K a multiple of 32) along the last dim to ``(blocks [..., K/32, 16], scales [..., K/32])``.

    ``x`` is read as float32 (bf16/fp16 exactly; float64 is rounded to float32 first). ``rule`` picks the scale for
    each block (module docstring). ``keep_scales`` (uint8 ``[..., K/32]``, e.g. the scales the weights were decoded
    from) keeps each block's scale unless a new value would round beyond ±6 at it; such blocks use ``rule``.
    To encode a transformers dense expert (``[E, in, out]``), pass ``w.transpose(-1, -2)``. ``kernel``: one of
    ``KERNELS`` (identical output; None = native on CPU, else compiled for large inputs; ``keep_scales`` always runs
    eager). ``out``: contiguous uint8 ``(blocks, scales)`` to write into (and return), as for ``decode``.
    """
    if rule not in RULES:
        raise MXFP4Error(f"unknown MXFP4 scale rule {rule!r}; choose one of {', '.join(RULES)}")
    if not x.dtype.is_floating_point:
        raise MXFP4Error(f"encode needs a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % BLOCK_SIZE:
        raise MXFP4Error(f"the last dimension ({tuple(x.shape)}) must be a multiple of {BLOCK_SIZE}")
    *prefix, cols = x.shape
    groups = cols // BLOCK_SIZE
    if keep_scales is not None:
        if keep_scales.dtype != torch.uint8 or tuple(keep_scales.shape) != (*prefix, groups):
            raise MXFP4Error(
                f"keep_scales must be uint8 of shape {(*prefix, groups)}, got {keep_scales.dtype} {tuple(keep_scales.shape)}"
            )
        keep_flat = keep_scales.reshape(-1).to(x.device)
    device = x.device
    n_blocks = math.prod(prefix) * groups
    out_blocks, out_scales = out if out is not None else (None, None)
    blocks = _output_buffer(out_blocks, "out[0] (blocks)", (*prefix, groups, BYTES_PER_BLOCK), torch.uint8, device)
    scales = _output_buffer(out_scales, "out[1] (scales)", (*prefix, groups), torch.uint8, device)
    encoded = (blocks, scales)
    blocks, scales = blocks.view(n_blocks, BYTES_PER_BLOCK), scales.view(n_blocks)
    x_blocks = x.reshape(n_blocks, BLOCK_SIZE)
    per_chunk = max(1, (chunk_elements or _default_chunk(device)) // BLOCK_SIZE)
    kernel = "eager" if keep_scales is not None else _pick_kernel(kernel, device, n_blocks * BLOCK_SIZE, compile_on_cpu=True)
    if kernel == "native" and n_blocks:
        _encode_native(_native_library(device), x_blocks, rule, blocks, scales, (*prefix, cols),
                       _native_blocks_per_call(chunk_elements))
        return encoded
    compiled = kernel == "compiled"
    for b0 in range(0, n_blocks, per_chunk):
        b1 = min(b0 + per_chunk, n_blocks)
        result = None
        if compiled and b1 - b0 == per_chunk:
            # widen outside the kernel: inductor does not vectorize the bf16 -> float32 load on CPU
            result = _run_compiled("encode", _compiled_encoder(rule), x_blocks[b0:b1].to(torch.float32))
            if result is not None:
                packed, chosen, amax_bits, ambiguous = result
                _check_finite(amax_bits, b0, (*prefix, cols))
                # float32 error sums cannot order near-ties exactly: redo those few blocks with the exact path
                redo = torch.nonzero(ambiguous).squeeze(-1)
                if redo.numel():
                    fixed_packed, fixed_scales, _ = _encode_eager(x_blocks[b0:b1].index_select(0, redo), rule, None)
                    packed[redo], chosen[redo] = fixed_packed, fixed_scales
        if result is None:
            keep = keep_flat[b0:b1] if keep_scales is not None else None
            packed, chosen, amax_bits = _encode_eager(x_blocks[b0:b1], rule, keep)
            _check_finite(amax_bits, b0, (*prefix, cols))
        blocks[b0:b1] = packed
        scales[b0:b1] = chosen
    return encoded


def _encode_native(library, x_blocks: torch.Tensor, rule: str, blocks: torch.Tensor, scales: torch.Tensor,
                   shape: tuple[int, ...], blocks_per_call: int) -> None:
    """Encode ``x_blocks [n, 32]`` into ``blocks``/``scales`` through the C kernel; near-tie ``best`` blocks are redone
    by the reference code (the kernel sums errors in a different order and flags them)."""
    if x_blocks.dtype not in (torch.bfloat16, torch.float32):
        x_blocks = x_blocks.to(torch.float32)  # fp16 exactly, float64 rounded once: what the reference reads
    x_blocks = x_blocks.contiguous()
    n_blocks = x_blocks.shape[0]
    amax_bits = torch.empty(n_blocks, dtype=torch.int32)
    ambiguous = torch.empty(n_blocks, dtype=torch.bool)
    encode_blocks = library.mxfp4_encode_bf16 if x_blocks.dtype == torch.bfloat16 else library.mxfp4_encode_f32
    rule_code = mxfp4_native.rule_code(rule)
    row_bytes = x_blocks.stride(0) * x_blocks.element_size()

    def work(start: int, stop: int) -> None:
        encode_blocks(x_blocks.data_ptr() + start * row_bytes, rule_code, blocks[start].data_ptr(),
                      scales[start:].data_ptr(), amax_bits[start:].data_ptr(), ambiguous[start:].data_ptr(), stop - start)

    _in_threads(n_blocks, blocks_per_call, work)
    _check_finite(amax_bits, 0, shape)
    redo = torch.nonzero(ambiguous).squeeze(-1)
    if redo.numel():
        fixed_packed, fixed_scales, _ = _encode_eager(x_blocks.index_select(0, redo), rule, None)
        blocks[redo], scales[redo] = fixed_packed, fixed_scales


def _check_finite(amax_bits: torch.Tensor, first_block: int, shape: tuple[int, ...]) -> None:
    bad = amax_bits >= 0x7F800000  # the float32 bits of inf / nan magnitudes
    if bool(bad.any()):
        block = first_block + int(torch.nonzero(bad)[0, 0])
        index = _unravel(block * BLOCK_SIZE, shape)
        raise MXFP4Error(f"cannot encode non-finite values (inf/nan) in the block starting at index {index}")


def _encode_eager(chunk: torch.Tensor, rule: str, keep: torch.Tensor | None):
    """(packed uint8 [n, 16], scale bytes uint8 [n], amax float32 bits [n]) of blocks ``chunk [n, 32]``."""
    device_str = str(chunk.device)
    chunk = chunk.to(torch.float32)
    bits = chunk.view(torch.int32)
    magnitude_bits = bits & 0x7FFFFFFF
    amax_bits = magnitude_bits.amax(dim=-1)
    if bool((amax_bits >= 0x7F800000).any()):
        return None, None, amax_bits
    magnitude = magnitude_bits.view(torch.float32)
    floor_rule, ceil_rule = _block_exponents(amax_bits)
    if keep is not None:
        chosen = floor_rule if rule == "ocp" else ceil_rule if rule == "noclip" else None
        if chosen is None:
            _, chosen = _quantize_best(magnitude, floor_rule, ceil_rule, device_str)
        kept = keep.to(torch.int32)
        amax = amax_bits.view(torch.float32)
        fits = (kept < 255) & (amax * _inverse_scales(device_str)[kept.clamp(max=254).long()] < _KEEP_SCALE_LIMIT)
        chosen = torch.where(fits, kept, chosen)
        codes = _round_to_grid(_scaled(magnitude, chosen, device_str))
    elif rule == "best":
        codes, chosen = _quantize_best(magnitude, floor_rule, ceil_rule, device_str)
    else:
        chosen = floor_rule if rule == "ocp" else ceil_rule
        codes = _round_to_grid(_scaled(magnitude, chosen, device_str))
    codes |= (bits >> 28) & 8  # sign bit -> code bit 3 (also for zeros and values that round to zero)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.to(torch.uint8), chosen.to(torch.uint8), amax_bits


def _quantize_best(magnitude: torch.Tensor, floor_rule: torch.Tensor, ceil_rule: torch.Tensor, device_str: str):
    """Codes and scale bytes of the ``best`` rule: per block the rule with the smaller squared error.

    Every block is quantized at the floor-rule scale; only blocks where the ceil rule differs (its scale is then
    exactly twice the floor one) are quantized a second time and compared, in float64 (exact for these sums of
    squares of exact float32 differences). Ties keep the floor rule (canonical output)."""
    codes = _round_to_grid(_scaled(magnitude, floor_rule, device_str))
    differ = torch.nonzero(ceil_rule != floor_rule).squeeze(-1)
    if differ.numel() == 0:
        return codes, floor_rule
    y = _scaled(magnitude.index_select(0, differ), floor_rule.index_select(0, differ), device_str)  # floor units
    floor_values = _magnitudes(device_str)[codes.index_select(0, differ).long()]
    ceil_codes, ceil_values = _round_to_grid(y * 0.5, with_values=True)
    err_floor = (y.to(torch.float64) - floor_values).square_().sum(-1)
    err_ceil = (y.to(torch.float64) - 2.0 * ceil_values.to(torch.float64)).square_().sum(-1)
    take = torch.nonzero(err_ceil < err_floor).squeeze(-1)
    rows = differ.index_select(0, take)
    codes[rows] = ceil_codes.index_select(0, take)
    chosen = floor_rule.clone()
    chosen[rows] = ceil_rule.index_select(0, rows)
    return codes, chosen


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, rem = divmod(flat, size)
        index.append(rem)
    return tuple(reversed(index))


# ------------------------------------------------------------------------------------------ compiled kernels
# The same arithmetic as the eager path, written without data-dependent indexing so inductor fuses it into one pass
# (C++/OpenMP on CPU, triton on CUDA). Tested bit-identical to the eager path (tests/quant/test_mxfp4.py, slow).


def _use_compiled(requested: bool | None, numel: int) -> bool:
    setting = os.environ.get("GPTOSS_MXFP4_COMPILE", "")
    if requested is not None:
        return requested
    if setting == "0":
        return False
    return setting == "1" or numel >= _COMPILE_MIN_ELEMENTS


def _run_compiled(kind: str, kernel, *args):
    """Run a compiled kernel; on a compiler failure warn once and return None (the caller falls back to eager)."""
    if kind in _compile_failed:
        return None
    try:
        return kernel(*args)
    except Exception as err:  # noqa: BLE001 - no compiler / triton: the eager path gives the same bits
        _compile_failed.add(kind)
        warnings.warn(f"MXFP4 {kind}: torch.compile failed ({type(err).__name__}: {err}); using the eager path")
        return None


def _grid_kernel(y: torch.Tensor):
    y = y.clamp(max=6.0)
    biased_exp = (y.view(torch.int32) >> 23).clamp(127, 129)
    step_inverse = ((255 - biased_exp) << 23).view(torch.float32)
    steps = torch.round(y * step_inverse)
    return steps.to(torch.int32) + ((biased_exp - 127) << 1), steps / step_inverse


def _encode_kernel(chunk: torch.Tensor, rule: str):
    x = chunk.to(torch.float32)
    bits = x.view(torch.int32)
    magnitude = x.abs()
    amax_bits = magnitude.amax(-1, keepdim=True).view(torch.int32)
    exponent = (amax_bits >> 23) - 127
    floor_rule = (exponent - 2).clamp(-127, 127)
    ceil_rule = (exponent - 2 + ((amax_bits & 0x7FFFFF) > 0x400000).to(torch.int32)).clamp(-127, 127)
    y = magnitude * ((127 - floor_rule) << 23).view(torch.float32)  # 2**-s exactly (s <= 125 for finite input)
    half = torch.where(ceil_rule > floor_rule, 0.5, 1.0)
    ambiguous = torch.zeros_like(amax_bits, dtype=torch.bool)
    if rule == "ocp":
        codes, _ = _grid_kernel(y)
        chosen = floor_rule
    elif rule == "noclip":
        codes, _ = _grid_kernel(y * half)
        chosen = ceil_rule
    else:
        floor_codes, floor_values = _grid_kernel(y)
        ceil_codes, ceil_values = _grid_kernel(y * half)
        err_floor = (y - floor_values).square().sum(-1, keepdim=True)
        err_ceil = (y - ceil_values / half).square().sum(-1, keepdim=True)
        take = err_ceil < err_floor
        codes = torch.where(take, ceil_codes, floor_codes)
        chosen = torch.where(take, ceil_rule, floor_rule)
        # float32 sums of 32 squares are good to ~2e-6 relative: closer calls are redone exactly (float64)
        ambiguous = (ceil_rule > floor_rule) & (err_floor > 0) & ((err_ceil - err_floor).abs() <= 1e-5 * err_floor)
    codes = codes | ((bits >> 28) & 8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return packed, (chosen + SCALE_BIAS).squeeze(-1).to(torch.uint8), amax_bits.squeeze(-1), ambiguous.squeeze(-1)


def _decode_kernel(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
    raw = blocks.to(torch.int32)
    codes = torch.stack([raw & 0x0F, raw >> 4], dim=-1).flatten(-2)  # [n, G, 32]: element 2j = low nibble
    magnitude = codes & 7
    exponent = magnitude >> 1
    mantissa = magnitude & 1
    # twice the E2M1 magnitude (0, 1, 2, 3, 4, 6, 8, 12) times 2**(s - 128): every product exact in float32, and
    # the scale byte 255 gives 0.5 * 2**128 = 2**127 and inf beyond, as transformers' ldexp does
    twice = torch.where(exponent == 0, mantissa, (2 + mantissa) << (exponent - 1).clamp(min=0)).to(torch.float32)
    s = scales.to(torch.int32).unsqueeze(-1)
    scale = torch.where(s >= 2, (s - 1) << 23, 0x200000 << s.clamp(max=1)).view(torch.float32)
    values = twice * scale
    values = torch.where(codes >= 8, -values, values)
    return values.to(dtype).flatten(-2)


@functools.lru_cache(maxsize=None)
def _compiled_encoder(rule: str):
    return torch.compile(functools.partial(_encode_kernel, rule=rule), dynamic=False)


@functools.lru_cache(maxsize=None)
def _compiled_decoder(dtype: torch.dtype):
    return torch.compile(functools.partial(_decode_kernel, dtype=dtype), dynamic=False)


def is_canonical(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per block: True if re-encoding its decoded values reproduces its bytes under every rule of this codec.

    That holds for an all-zero block with scale byte 0, and for a block whose largest magnitude is 4 or 6 (codes
    6/7) at a scale byte below 255 (formats.md §3.4). Others decode → encode to the same *values* with new bytes.
    """
    _check_codes(blocks, scales)
    lo = blocks & 0x07
    hi = (blocks >> 4) & 0x07
    top = torch.maximum(lo, hi).amax(dim=-1)
    # an all-zero block encodes as scale 0 and keeps each zero's sign (codes 0/8 preserved)
    return ((top >= 6) & (scales < 255)) | ((top == 0) & (scales == 0))


def requantization_error(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-block squared error ``sum((x - decode(blocks, scales))**2)`` in float64 (diagnostics and tests)."""
    decoded = decode(blocks, scales, dtype=torch.float64)
    diff = x.to(torch.float64) - decoded
    return diff.square().reshape(*diff.shape[:-1], -1, BLOCK_SIZE).sum(-1)
