"""The native C kernel of the MXFP4 codec (quant/mxfp4_native.py) against the eager torch reference, bit for bit, on
edge-case-rich data and across threads; and the fallbacks when it cannot be built."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gptoss_train.quant import mxfp4, mxfp4_native
from gptoss_train.quant.mxfp4 import MXFP4Error, decode, encode

pytestmark = pytest.mark.skipif(
    mxfp4._native_library(torch.device("cpu")) is None, reason="the native MXFP4 kernel could not be built (no C compiler)"
)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Both the serial loop and the thread pool (pieces handed to 2 threads) must give the reference's bytes."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


def _every_code_at_every_scale() -> tuple[torch.Tensor, torch.Tensor]:
    """[4 matrices, 64 rows, 16 groups]: every byte value at every scale byte 0..255 (255 decodes to inf / 2**127)."""
    byte = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    blocks = byte.expand(256, 16, 16).reshape(4, 64, 16, 16).contiguous()
    scales = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 16).reshape(4, 64, 16).contiguous()
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("transpose", [False, True], ids=["hf", "transposed"])
def test_decode_equals_reference_every_code_and_scale(dtype, transpose, threads):
    blocks, scales = _every_code_at_every_scale()
    reference = decode(blocks, scales, dtype=dtype, transpose=transpose, kernel="eager")
    for chunk in (None, 32 * 7):  # 7 blocks per call: pieces end mid-row and mid-matrix
        ours = decode(blocks, scales, dtype=dtype, transpose=transpose, kernel="native", chunk_elements=chunk)
        assert ours.shape == reference.shape and ours.dtype == dtype
        assert torch.equal(_bits(ours), _bits(reference))  # -0.0, subnormals, inf included


def test_decode_random_bytes_and_non_contiguous_input_equal_reference(threads):
    gen = torch.Generator().manual_seed(11)
    blocks = torch.randint(0, 256, (3, 40, 9, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 256, (3, 40, 9), dtype=torch.uint8, generator=gen)
    strided_blocks, strided_scales = blocks[:, ::2], scales[:, ::2]  # not contiguous: copied before the C call
    for b, s in ((blocks, scales), (strided_blocks, strided_scales)):
        reference = decode(b, s, kernel="eager")
        assert torch.equal(_bits(decode(b, s, kernel="native", chunk_elements=32 * 5)), _bits(reference))


def _rne_error(y: np.ndarray) -> np.ndarray:
    """Per-row squared error of rounding y >= 0 half-to-even onto the E2M1 grid (saturating at 6), in float64."""
    grid = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    dist = np.abs(np.minimum(y, 6.0)[..., None] - grid)
    candidates = dist == dist.min(-1, keepdims=True)
    even = candidates & (np.arange(8) % 2 == 0)
    choice = np.where(even.any(-1), even.argmax(-1), candidates.argmax(-1))
    return ((y - grid[choice]) ** 2).sum(-1)


def _near_best_ties(rng: np.random.Generator, n: int) -> np.ndarray:
    """Blocks (at their floor scale) where the two rules' squared errors differ by ~2**-24 of ~1: below what float32
    sums resolve. y0 = 7 + e makes the rules differ; y1 = 1.25 + t moves err_ceil - err_floor by exactly t (floor
    rounds it to 1.5, ceil to 1.0), so t is set to cancel the difference the other elements make (then rounded to
    float32, which leaves a residue of at most ~2**-24)."""
    y = np.zeros((n, 32))
    y[:, 0] = rng.uniform(7.0, 7.2, n).astype(np.float32)  # alone: err_floor - err_ceil = 4 y0 - 28 in (0, 0.8)
    y[:, 1] = 1.25
    y[:, 2:5] = rng.uniform(0, 6, (n, 3)).astype(np.float32)
    t = _rne_error(y) - 4.0 * _rne_error(y / 2.0)  # err_floor - err_ceil (ceil errors are 4x in floor units)
    keep = (t > 1e-3) & (t < 0.2)
    y = y[keep]
    y[:, 1] = (1.25 + t[keep]).astype(np.float32)
    signs = rng.choice([-1.0, 1.0], y.shape)
    return rng.permuted(y * signs * np.exp2(rng.integers(-20, 20, (len(y), 1))), axis=1)


def _encode_cases() -> dict[str, torch.Tensor]:
    """Blocks of 32 where an encoder goes wrong first: RNE ties, the clip/no-clip boundary, exact `best` ties,
    signed zeros, subnormals, the float32 extremes, powers of two +- 1 ulp; plus every finite bf16 bit pattern."""
    rng = np.random.default_rng(7)
    cases = {}
    # exact E2M1 midpoints and grid points (and beyond 6: 6.5, 7 round or clip) at random scales, random signs
    points = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 6.5, 7.0, 7.5])
    ties = points[rng.integers(0, len(points), (512, 32))] * rng.choice([-1.0, 1.0], (512, 32))
    cases["ties"] = ties * np.exp2(rng.integers(-30, 30, (512, 1)))
    # `best` decides by an exact tie: {7, 2, 4, 0, ...}: floor error (7-6)^2 = ceil error (7-8)^2, the rest exact
    exact_tie = np.zeros((256, 32))
    exact_tie[:, 0], exact_tie[:, 1], exact_tie[:, 2] = 7.0, 2.0, 4.0
    exact_tie *= rng.choice([-1.0, 1.0], (256, 32)) * np.exp2(rng.integers(-20, 20, (256, 1)))
    cases["exact_best_ties"] = rng.permuted(exact_tie, axis=1)
    cases["near_best_ties"] = _near_best_ties(rng, 4096)
    # amax just below / at / above 1.5 * 2^k (where floor and ceil rules start to differ) and at powers of two
    base = np.exp2(rng.integers(-40, 40, (256, 1))).astype(np.float32)
    edge = (rng.normal(0, 0.3, (256, 32)).astype(np.float32)) * base
    anchor = np.float32(1.5) * base[:, 0]
    picks = [np.nextafter(anchor, np.float32(0)), anchor, np.nextafter(anchor, np.float32(np.inf)), base[:, 0],
             np.nextafter(base[:, 0], np.float32(0))]
    edge[:, 0] = np.choose(np.arange(256) % 5, picks)  # row i takes the amax candidate i % 5
    cases["scale_edges"] = edge
    # tiny / huge: subnormal blocks, blocks mixing 2**-149 with normals, 3.3e38 (scale byte 252)
    tiny = rng.normal(0, 1, (64, 32)) * np.exp2(rng.integers(-149, -120, (64, 1)))
    tiny[::3, 5] = 0.0
    tiny[1::4, 7] = -0.0
    cases["tiny"] = tiny
    huge = rng.normal(0, 1, (16, 32)) * 1e37
    huge[:, 0] = 3.3e38 * rng.choice([-1.0, 1.0], 16)  # near the bf16 maximum (float32 max: the bit patterns)
    cases["huge"] = huge
    zeros = np.zeros((8, 32))
    zeros[::2, 3::5] = -0.0
    zeros[1, 9] = 2.0**-149
    cases["zeros"] = zeros
    cases["gaussian_heavy_tails"] = rng.standard_t(2, (2048, 32)) * 0.02
    # random float32 bit patterns over the whole finite range (each block spans many exponents)
    raw = rng.integers(0, 2**32, (1024, 32), dtype=np.uint64).astype(np.uint32)
    raw[(raw & 0x7F800000) == 0x7F800000] &= 0xBFFFFFFF  # turn inf/nan patterns into finite ones
    cases["float32_bit_patterns"] = raw.view(np.float32)
    out = {name: torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(-1, 32)) for name, v in cases.items()}
    # every finite bf16 value (both signs), shuffled into blocks
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    finite = patterns[((patterns.to(torch.int32) & 0x7F80) != 0x7F80)]
    out["all_bf16"] = finite[torch.randperm(finite.numel(), generator=torch.Generator().manual_seed(3))][: finite.numel() // 32 * 32].view(torch.bfloat16).float().reshape(-1, 32)
    # decoded MXFP4 blocks: exactly representable, so `best` meets many exact ties
    gen = torch.Generator().manual_seed(5)
    out["mxfp4_values"] = decode(torch.randint(0, 256, (512, 16), dtype=torch.uint8, generator=gen).reshape(512, 1, 16),
                                 torch.randint(60, 200, (512, 1), dtype=torch.uint8, generator=gen), dtype=torch.float32).reshape(-1, 32)
    return out


_CASES = _encode_cases()


@pytest.mark.parametrize("case", sorted(_CASES))
@pytest.mark.parametrize("rule", mxfp4.RULES)
def test_encode_equals_reference(case, rule, threads):
    x = _CASES[case]
    inputs = {"float32": x}
    if case not in ("tiny", "float32_bit_patterns"):  # these do not survive bf16 / fp16 / float64 round trips usefully
        inputs["bfloat16"] = x.bfloat16()
        inputs["float16"] = x.clamp(-60000, 60000).half()
    inputs["float64"] = x.double() * (1 + 2.0**-30)  # rounded to float32 first, as the reference does
    for name, data in inputs.items():
        reference = encode(data, rule=rule, kernel="eager")
        ours = encode(data, rule=rule, kernel="native", chunk_elements=32 * 37)
        assert torch.equal(ours[0], reference[0]), (case, name)
        assert torch.equal(ours[1], reference[1]), (case, name)


def test_encode_near_ties_are_redone_by_the_reference(monkeypatch):
    """The kernel flags `best` blocks whose two errors are too close for its float32 sums; the reference decides
    those. Exact ties must reach that path (and then follow the reference: ties keep the floor rule)."""
    redone = []
    reference_encode = mxfp4._encode_eager

    def recording(chunk, rule, keep):
        redone.append(chunk.shape[0])
        return reference_encode(chunk, rule, keep)

    monkeypatch.setattr(mxfp4, "_encode_eager", recording)
    x = _CASES["near_best_ties"]  # most of them exact ties, the rest within 2**-24
    blocks, scales = encode(x, rule="best", kernel="native")
    assert redone and redone[0] > 0.9 * x.shape[0]
    monkeypatch.setattr(mxfp4, "_encode_eager", reference_encode)
    assert torch.equal(blocks, encode(x, rule="best", kernel="eager")[0])
    assert torch.equal(scales, encode(x, rule="best", kernel="eager")[1])


def test_best_keeps_the_floor_rule_without_comparing_when_no_element_exceeds_7():
    """Blocks whose maximum lies in (6, 7] at the floor scale: the rules differ, but the ceil rule cannot win, so the
    kernel skips the comparison; {7, 2, 4}: both errors are exactly 1 (a tie: floor); {7 - ulp, ...}: floor wins."""
    x = _CASES["exact_best_ties"]
    ours = encode(x, rule="best", kernel="native")
    assert torch.equal(ours[1], encode(x, rule="ocp", kernel="eager")[1])
    assert torch.equal(ours[0], encode(x, rule="best", kernel="eager")[0])
    y = torch.rand(4096, 32) * 6
    y[:, 0] = 6 + torch.rand(4096)  # (6, 7)
    for data in (y, y.bfloat16()):
        reference = encode(data, rule="best", kernel="eager")
        assert torch.equal(reference[1], encode(data, rule="ocp", kernel="eager")[1])
        ours = encode(data, rule="best", kernel="native")
        assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])


def test_encode_non_contiguous_and_sliced_input(threads):
    x = torch.randn(6, 64, 96) * 0.05
    for view in (x.transpose(1, 2), x[:, 1:], x[..., 32:]):
        reference = encode(view, kernel="eager")
        ours = encode(view, kernel="native", chunk_elements=32 * 5)
        assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_encode_non_finite_error_names_the_block(value, threads):
    x = torch.zeros(3, 4, 64, dtype=torch.bfloat16)
    x[2, 1, 40] = value
    x[2, 3, 0] = value  # the first bad block is reported
    with pytest.raises(MXFP4Error, match=r"non-finite.*\(2, 1, 32\)"):
        encode(x, kernel="native", chunk_elements=64)


def test_auto_uses_native_on_cpu_and_falls_back_without_it(monkeypatch):
    x = torch.randn(4, 256) * 0.1
    assert mxfp4._pick_kernel(None, torch.device("cpu"), x.numel(), compile_on_cpu=True) == "native"
    expected = encode(x, kernel="eager")
    monkeypatch.setattr(mxfp4_native, "load", lambda: None)
    assert mxfp4._pick_kernel(None, torch.device("cpu"), x.numel(), compile_on_cpu=True) == "eager"
    fallback = encode(x)
    assert torch.equal(fallback[0], expected[0]) and torch.equal(fallback[1], expected[1])
    assert torch.equal(decode(*fallback), decode(*expected, kernel="eager"))
    with pytest.raises(MXFP4Error, match="native MXFP4 kernel is unavailable"):
        encode(x, kernel="native")
    with pytest.raises(MXFP4Error, match="unknown MXFP4 kernel"):
        decode(*expected, kernel="triton")


def test_build_failure_warns_once_and_returns_none(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTOSS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    mxfp4_native.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert mxfp4_native.load() is None
            assert mxfp4_native.load() is None  # cached: no second build, no second warning
        assert len(caught) == 1 and "could not build the native CPU kernel" in str(caught[0].message)
        monkeypatch.setenv("GPTOSS_MXFP4_NATIVE", "0")
        mxfp4_native.load.cache_clear()
        assert mxfp4_native.load() is None
    finally:
        mxfp4_native.load.cache_clear()  # later tests rebuild (from the real cache) with the real compiler


def test_compiler_without_march_native_gets_a_portable_build(monkeypatch, tmp_path):
    real_compiler = mxfp4_native.shutil.which("cc") or mxfp4_native.shutil.which("gcc")
    fussy = tmp_path / "fussy-cc"
    fussy.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = "-march=native" ] && { echo "unsupported: -march=native" >&2; exit 1; }; done\n'
        f'exec {real_compiler} "$@"\n'
    )
    fussy.chmod(0o755)
    monkeypatch.setenv("GPTOSS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fussy))
    mxfp4_native.load.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fallback build is silent
            assert mxfp4_native.load() is not None
        x = _CASES["gaussian_heavy_tails"]
        ours, reference = encode(x, kernel="native"), encode(x, kernel="eager")
        assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    finally:
        mxfp4_native.load.cache_clear()
