"""A small C kernel for the MXFP4 codec on CPU, built on first use with the system C compiler and loaded by ctypes.

Why: on CPU neither eager torch (~15 passes over the data per chunk) nor inductor's C++ (it splits the block
reductions into separate passes and scalarises the bit casts) gets close to one pass per 32-element block: decode +
encode of every gpt-oss-20b expert took ~106 s of CPU time that way (and far longer on a busy machine, where
OpenMP threads spin on a core someone else holds). This kernel does each block in one pass, in registers,
auto-vectorised by the compiler; ``mxfp4`` runs it on torch's thread count in Python threads (ctypes releases the
GIL). Decoding the 38 GB of bf16 to fresh tensors now costs more in the operating system (zeroing new pages) than in
the kernel: ``decode(out=...)`` / ``encode(out=...)`` let a loop over layers reuse its buffers.

It is an accelerator only. ``gptoss_train.quant.mxfp4``'s eager torch code stays the reference (the tests check this
kernel against it bit for bit), and whenever the kernel cannot be built (no compiler, Windows,
``GPTOSS_MXFP4_NATIVE=0``) the codec uses the torch paths with the same results (one warning if a build failed).

Exactness is the reference's, by construction:

* decode gathers from the same exact 65,536-entry pair table (``mxfp4._pair_table``) the eager path uses;
* encode does the reference's float32 arithmetic (amax from the bits, ``|x| * 2**-s`` by an exact power of two, RNE
  onto the E2M1 grid through ``rint``, the grid value as a product by a power of two);
* ``best``: where the rules differ but no element exceeds 7 at the floor scale, the floor rule provably wins or
  ties (see ``encode_block``); elsewhere the kernel sums the squared errors in float32 (within ~5e-7 relative of
  the exact sums) and flags a block *ambiguous* when they are within 1e-5 of each other: the caller redoes those
  (rare) blocks with the reference code, whose float64 sums decide.

Built with ``-O3 -march=native`` (portable flags if the compiler rejects that): the library is cached per CPU,
compiler and source hash under ``$GPTOSS_CACHE_DIR`` or ``~/.cache/gptoss-train``. No torch headers are needed, so
a build takes under a second.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float f32_from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t bits_from_f32(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

/* decode: out[i] = table[(scale << 8) | byte] for every byte; the table holds both decoded elements of a byte */
void mxfp4_decode_u32(const uint8_t *blocks, const uint8_t *scales, const uint32_t *table, uint32_t *out,
                      int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++) {
        const uint32_t *row = table + ((uint32_t)scales[b] << 8);
        const uint8_t *in = blocks + 16 * b;
        uint32_t *o = out + 16 * b;
        for (int j = 0; j < 16; j++) o[j] = row[in[j]];
    }
}

void mxfp4_decode_u64(const uint8_t *blocks, const uint8_t *scales, const uint64_t *table, uint64_t *out,
                      int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++) {
        const uint64_t *row = table + ((uint32_t)scales[b] << 8);
        const uint8_t *in = blocks + 16 * b;
        uint64_t *o = out + 16 * b;
        for (int j = 0; j < 16; j++) o[j] = row[in[j]];
    }
}

/* The reference's _round_to_grid for one scaled magnitude y >= 0: its E2M1 code (round half to even, saturating at
   6) with e = clamp(biased exponent, 127, 129) and code = rint(y * 2**(128-e)) + 2(e-127); and the grid value
   rint(..) * 2**(e-128) (a product by a power of two: exactly the reference's division by 2**(128-e)). Written per
   element and inlined into 16-lane loops, which the compiler turns into vector code. */
static inline int32_t grid_code(float y, float *value) {
    float v = y < 6.0f ? y : 6.0f;
    int32_t e = (int32_t)(bits_from_f32(v) >> 23);
    e = e < 127 ? 127 : (e > 129 ? 129 : e);
    float steps = rintf(v * f32_from_bits((uint32_t)(255 - e) << 23));
    *value = steps * f32_from_bits((uint32_t)(e - 1) << 23);
    return (int32_t)steps + ((e - 127) << 1);
}

static inline float sum16(const float *terms) {
    float partial[8];
    for (int i = 0; i < 8; i++) partial[i] = terms[i] + terms[i + 8];
    for (int i = 0; i < 4; i++) partial[i] += partial[i + 4];
    return (partial[0] + partial[2]) + (partial[1] + partial[3]);
}

enum { RULE_BEST = 0, RULE_OCP = 1, RULE_NOCLIP = 2 };

/* Encode one block given as float32 bit patterns of its even (lo) and odd (hi) elements: byte j of the block holds
   element 2j in its low nibble and 2j+1 in its high nibble. Returns the amax bits; >= 0x7f800000 (inf/nan) means
   nothing was written. */
static inline uint32_t encode_block(const uint32_t *lo, const uint32_t *hi, int rule, uint8_t *packed,
                                    uint8_t *scale, uint8_t *ambiguous) {
    uint32_t amax = 0;
    for (int i = 0; i < 16; i++) {
        uint32_t a = lo[i] & 0x7fffffffu, b = hi[i] & 0x7fffffffu;
        uint32_t m = a > b ? a : b;
        amax = m > amax ? m : amax;
    }
    *ambiguous = 0;
    if (amax >= 0x7f800000u) return amax;
    int32_t exponent = (int32_t)(amax >> 23) - 127;
    int32_t floor_rule = exponent - 2;
    floor_rule = floor_rule < -127 ? -127 : (floor_rule > 127 ? 127 : floor_rule);
    int32_t ceil_rule = exponent - 2 + ((amax & 0x7fffffu) > 0x400000u);
    ceil_rule = ceil_rule < -127 ? -127 : (ceil_rule > 127 ? 127 : ceil_rule);
    int32_t chosen = rule == RULE_NOCLIP ? ceil_rule : floor_rule;
    float inverse = f32_from_bits((uint32_t)(127 - chosen) << 23); /* 2**-chosen, exact: chosen <= 126 if finite */
    int32_t code_lo[16], code_hi[16];
    /* `best` only has a choice where the rules differ: then, at the floor scale, the block maximum y lies in (6, 8).
       The ceil rule's grid in floor units, {0, 1, 2, 3, 4, 6, 8, 12}, is the floor grid's subset {0, ..., 4, 6} plus
       8 and 12, so no element y <= 7 is closer to it than to the floor grid: every error term of the ceil rule is
       >= the floor rule's, exactly (the terms are exact in float64, and float64 sums in the same order keep >=).
       Unless some y > 7 (amax mantissa > 1.75), the reference therefore keeps the floor rule: no need to compare. */
    if (rule == RULE_BEST && ceil_rule != floor_rule && (amax & 0x7fffffu) > 0x600000u) {
        /* the ceil scale is twice the floor one: quantize y / 2 too, and compare the squared errors in floor units
           (float32 sums: each difference is exact and every term >= 0, so a sum is within ~8 * 2**-24 relative) */
        int32_t ceil_lo[16], ceil_hi[16];
        float err_floor_terms[16], err_ceil_terms[16];
        for (int i = 0; i < 16; i++) {
            float y_lo = f32_from_bits(lo[i] & 0x7fffffffu) * inverse;
            float y_hi = f32_from_bits(hi[i] & 0x7fffffffu) * inverse;
            float v_lo, v_hi, w_lo, w_hi;
            code_lo[i] = grid_code(y_lo, &v_lo);
            code_hi[i] = grid_code(y_hi, &v_hi);
            ceil_lo[i] = grid_code(y_lo * 0.5f, &w_lo);
            ceil_hi[i] = grid_code(y_hi * 0.5f, &w_hi);
            float d_lo = y_lo - v_lo, d_hi = y_hi - v_hi;
            float e_lo = y_lo - 2.0f * w_lo, e_hi = y_hi - 2.0f * w_hi;
            err_floor_terms[i] = d_lo * d_lo + d_hi * d_hi;
            err_ceil_terms[i] = e_lo * e_lo + e_hi * e_hi;
        }
        float err_floor = sum16(err_floor_terms), err_ceil = sum16(err_ceil_terms);
        float diff = err_ceil - err_floor;
        float larger = err_ceil > err_floor ? err_ceil : err_floor;
        /* float32 sums cannot order near-ties the way the reference's float64 sums do: the caller redoes these */
        *ambiguous = (diff < 0 ? -diff : diff) <= 1e-5f * larger;
        if (err_ceil < err_floor) {
            chosen = ceil_rule;
            memcpy(code_lo, ceil_lo, sizeof code_lo);
            memcpy(code_hi, ceil_hi, sizeof code_hi);
        }
    } else {
        for (int i = 0; i < 16; i++) {
            float unused;
            code_lo[i] = grid_code(f32_from_bits(lo[i] & 0x7fffffffu) * inverse, &unused);
            code_hi[i] = grid_code(f32_from_bits(hi[i] & 0x7fffffffu) * inverse, &unused);
        }
    }
    /* the sign goes to code bit 3, for zeros and values rounded to zero too */
    for (int i = 0; i < 16; i++)
        packed[i] = (uint8_t)((code_lo[i] | ((lo[i] >> 28) & 8u)) | ((code_hi[i] | ((hi[i] >> 28) & 8u)) << 4));
    *scale = (uint8_t)(chosen + 127);
    return amax;
}

/* x: n_blocks * 32 float32 (as bits) or bfloat16 (as uint16 pairs); amax_bits[b] >= 0x7f800000 marks a non-finite
   block (the caller raises) */
void mxfp4_encode_f32(const uint32_t *x, int rule, uint8_t *packed, uint8_t *scales, uint32_t *amax_bits,
                      uint8_t *ambiguous, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++) {
        uint32_t lo[16], hi[16];
        for (int i = 0; i < 16; i++) {
            lo[i] = x[32 * b + 2 * i];
            hi[i] = x[32 * b + 2 * i + 1];
        }
        amax_bits[b] = encode_block(lo, hi, rule, packed + 16 * b, scales + b, ambiguous + b);
    }
}

void mxfp4_encode_bf16(const uint32_t *x, int rule, uint8_t *packed, uint8_t *scales, uint32_t *amax_bits,
                       uint8_t *ambiguous, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++) {
        uint32_t lo[16], hi[16];
        for (int i = 0; i < 16; i++) {
            uint32_t pair = x[16 * b + i]; /* element 2i in the low half (little-endian) */
            lo[i] = pair << 16;
            hi[i] = pair & 0xffff0000u;
        }
        amax_bits[b] = encode_block(lo, hi, rule, packed + 16 * b, scales + b, ambiguous + b);
    }
}
"""

# -fno-math-errno / -fno-trapping-math let the compiler vectorise rintf; neither changes a result (no value here is
# NaN or inf, and rint's rounding mode is the default round-half-to-even). -ffp-contract=off: no fused multiply-adds,
# every product is rounded as torch rounds it. No -ffast-math: it would reorder sums and drop signed zeros.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-shared", "-std=c99"]
_RULE_CODES = {"best": 0, "ocp": 1, "noclip": 2}


def _cpu_identity() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("GPTOSS_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "gptoss-train")
    return Path(root) / "mxfp4-native"


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    errors = []
    # -march=native first; a compiler that does not know it (some clang targets) gets portable code instead
    for flags in (_FLAGS, [flag for flag in _FLAGS if flag != "-march=native"]):
        key = hashlib.sha256("\0".join([_SOURCE, " ".join(flags), version, _cpu_identity(), platform.machine()]).encode())
        target = _cache_dir() / f"mxfp4_{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source = Path(tmp) / "mxfp4.c"
            source.write_text(_SOURCE)
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"], capture_output=True,
                                    text=True, timeout=300)
            if result.returncode == 0:
                os.replace(built, target)  # atomic: a concurrent build of the same key writes the same bytes
                return target
            errors.append(result.stderr.strip()[-1000:])
    raise RuntimeError(f"{compiler} failed: {errors[-1]}")


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with one warning if a build was attempted and failed)."""
    if os.environ.get("GPTOSS_MXFP4_NATIVE", "") == "0" or sys.platform == "win32":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"MXFP4: could not build the native CPU kernel ({err}); using the torch paths (same results, slower)")
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("mxfp4_decode_u32", "mxfp4_decode_u64"):
        getattr(library, name).argtypes = [pointer, pointer, pointer, pointer, i64]
        getattr(library, name).restype = None
    for name in ("mxfp4_encode_f32", "mxfp4_encode_bf16"):
        getattr(library, name).argtypes = [pointer, i32, pointer, pointer, pointer, pointer, i64]
        getattr(library, name).restype = None
    return library


def rule_code(rule: str) -> int:
    return _RULE_CODES[rule]


_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux (x86-64, arm64, ...)
_HUGE_PAGE = 1 << 21
# outputs at least this big are worth it (a 20b gate_up stack decodes to 1 GiB of bf16)
_HUGE_PAGE_MIN_BYTES = 64 << 20


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    if "[never]" in mode or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def advise_huge_pages(tensor) -> None:
    """Ask Linux to back a large, not yet written output with 2 MiB pages (transparent huge pages, ``madvise``).

    Why: the codec's CPU time on big tensors was mostly spent in the kernel faulting in fresh 4 KiB pages (12.6 M
    faults, 33 s of system time, for the 20b benchmark's 50 GB of outputs): one fault per 2 MiB instead costs about a
    quarter. Best effort: without THP, or when the kernel has no huge page to give, nothing changes."""
    nbytes = tensor.numel() * tensor.element_size()
    libc = _libc() if nbytes >= _HUGE_PAGE_MIN_BYTES and os.environ.get("GPTOSS_MXFP4_HUGEPAGES", "") != "0" else None
    if libc is None:
        return
    start = (tensor.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    length = (tensor.data_ptr() + nbytes - start) & ~(_HUGE_PAGE - 1)
    if length > 0:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE)  # failure is harmless
