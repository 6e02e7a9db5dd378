"""The fused Triton decode step (gen_kernels) against the eager decode step, run by Triton's CPU interpreter.

The interpreter must be switched on (TRITON_INTERPRET=1) before anything imports Triton, so the outer test re-runs
this file in a subprocess with it set; the inner tests are skipped in the ordinary run. Skipped where Triton is not
installed (CPU-only CI); on a GPU machine scripts/gpu_check_generate.py compares the two steps on the 20b shape.
Locally: `pip install --target /tmp/tritonlib triton==3.6.0` and PYTHONPATH=/tmp/tritonlib.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptoss_train.kernels.gen_model import KVCache, collect_weights, decode_step, decode_step_fused, prefill

from test_generation import PROMPTS, _tiny_model  # noqa: E402 (rootdir-relative test module)


INNER = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INNER, reason="this is the outer runner")
def test_fused_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        env=env, cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 7, run.stdout[-2000:]  # route_sort, 2 GEMMs, 3 fused steps, choice


@pytest.mark.skipif(INNER, reason="compiles for real, not interpreted")
def test_kernels_compile_for_hopper():
    # Every kernel through Triton's whole compiler (frontend, LLVM, ptxas) for sm_90, no GPU needed: the interpreter
    # does not check what the compiler rejects (a loop variable changing type was seen failing only on the H100).
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gptoss_train.kernels import gen_kernels as K

    bf, f32, i64, i32, u8 = "*bf16", "*fp32", "*i64", "*i32", "*u8"
    cases = [
        (K._add_rms_norm_kernel, dict(x_ptr=bf, delta_ptr=bf, w_ptr=f32, x_out_ptr=bf, h_out_ptr=bf, n="i32",
                                      eps="fp32"), dict(HAS_DELTA=True, BLOCK=4096)),
        (K._rope_kv_write_kernel, dict(qkv_ptr=bf, pos_ptr=i64, cos_ptr=bf, sin_ptr=bf, q_out_ptr=bf, k_cache_ptr=bf,
                                       v_cache_ptr=bf, cache_len="i32"), dict(RING=True, H=64, HKV=8, D=64)),
        (K._decode_attention_kernel, dict(q_ptr=bf, k_cache_ptr=bf, v_cache_ptr=bf, pos_ptr=i64, sinks_ptr=bf,
                                          out_ptr=bf, part_m_ptr=f32, part_l_ptr=f32, part_acc_ptr=f32,
                                          cache_len="i32", kv_len="i32", splits="i32", scale="fp32"),
         dict(SPLIT_LEN=256, ONE_SPLIT=False, G=8, GB=16, HKV=8, D=64, BLOCK_L=64)),
        (K._attention_combine_kernel, dict(part_m_ptr=f32, part_l_ptr=f32, part_acc_ptr=f32, out_ptr=bf,
                                           splits="i32"), dict(G=8, GB=16, HKV=8, D=64)),
        (K._route_sort_kernel, dict(logits_ptr=bf, n_tokens="i32", flat_e_ptr=i32, flat_w_ptr=f32, denom_ptr=f32,
                                    scores_ptr=bf, order_ptr=i64, expert_ptr=i64, token_ptr=i64, inv_ptr=i64,
                                    offs_ptr=i32), dict(E=32, EB=32, K=4, TB=64, PB=256, CHUNK=32)),
        (K._bias_swiglu_kernel, dict(gate_up_ptr=bf, bias_ptr=bf, expert_ptr=i64, out_ptr=bf, inter="i32",
                                     alpha="fp32", limit="fp32"), dict(BLOCK=1024)),
        (K._moe_combine_kernel, dict(x_ptr=bf, pairs_ptr=bf, bias_ptr=bf, expert_ptr=i64, scores_ptr=bf, inv_ptr=i64,
                                     w_ptr=f32, x_out_ptr=bf, h_out_ptr=bf, n="i32", eps="fp32"), dict(K=4, BLOCK=4096)),
        (K._expert_gemm_kernel, dict(x_ptr=bf, x_rows_ptr=i64, w_ptr=bf, offs_ptr=i32, out_ptr=bf),
         dict(K=2880, N=5760, GATHER=True, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64)),
        (K._expert_gemm_mxfp4_kernel, dict(x_ptr=bf, x_rows_ptr=i64, blocks_ptr=u8, scales_ptr=u8, offs_ptr=i32,
                                           out_ptr=bf), dict(K=2880, N=5760, GATHER=True, BLOCK_M=16, BLOCK_N=64,
                                                             BLOCK_K=64)),
    ]
    for fn, signature, constants in cases:
        signature = dict(signature, **{name: "constexpr" for name in constants})
        constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))


@pytest.fixture(scope="module")
def kernels():
    if not INNER:
        pytest.skip("run by test_fused_kernels_under_the_triton_interpreter (needs TRITON_INTERPRET=1 from the start)")
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    # Triton 3.6's interpreter turns a scalar into a 1-element array and int() of that fails on numpy 2: loops with
    # run-time bounds (expert_gemm's row tiles) need this one-line fix of its __index__.
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    return importlib.import_module("gptoss_train.kernels.gen_kernels")


def test_fused_step_is_chosen_where_it_applies(monkeypatch):
    from gptoss_train.kernels import gen_kernels
    from gptoss_train.kernels.gen_model import fused_decode_supported

    w = collect_weights(_tiny_model(), max_seq_len=16)
    monkeypatch.setattr(gen_kernels, "available", lambda device: True)  # as on a CUDA device with Triton
    assert fused_decode_supported(w, batch=4, use_grouped=True)
    assert not fused_decode_supported(w, batch=4, use_grouped=False)
    assert not fused_decode_supported(w, batch=gen_kernels.MAX_FUSED_PAIRS, use_grouped=True)  # top-2: too many pairs


def _prefilled(model, prompts, max_seq_len=48, keep_mxfp4=False):
    w = collect_weights(model, max_seq_len=max_seq_len, keep_mxfp4=keep_mxfp4)
    cache = KVCache(w, slots=len(prompts), max_seq_len=max_seq_len)
    first = prefill(w, cache, prompts, list(range(len(prompts))), use_grouped=True).argmax(-1)
    return w, cache, first


def test_route_sort_matches_eager_routing(kernels):
    from gptoss_train.kernels.gen_model import route

    torch.manual_seed(0)
    logits = torch.randn(5, 32)
    scores, order, expert, token, offs, inv = kernels.route_sort(logits, 4, torch.float32)
    ref_scores, ref_order, ref_expert, ref_token, ref_offs = route(logits, 4, 32)
    assert torch.equal(order, ref_order) and torch.equal(expert, ref_expert) and torch.equal(token, ref_token)
    assert torch.equal(offs, ref_offs)
    assert torch.allclose(scores, ref_scores, atol=1e-6)
    assert torch.equal(order[inv], torch.arange(20))  # inv is the inverse permutation


def test_expert_gemm_matches_grouped_mm(kernels):
    torch.manual_seed(1)
    weight = torch.randn(4, 48, 80)  # K, N not multiples of the blocks: masked edges
    counts = torch.tensor([3, 0, 18, 1])  # an empty expert, one with more rows than a 16-row tile
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 48)
    expert = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.bmm(x[:, None, :], weight[expert]).squeeze(1)
    got = kernels.expert_gemm(x, weight, offs)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    tokens = torch.randint(0, 5, (x.shape[0],))  # rows read through an index (the routed tokens), no copy
    source = torch.randn(5, 48)
    ref = torch.bmm(source[tokens][:, None, :], weight[expert]).squeeze(1)
    assert torch.allclose(kernels.expert_gemm(source, weight, offs, x_rows=tokens), ref, atol=1e-4, rtol=1e-4)


def test_expert_gemm_reads_mxfp4_like_its_decoded_weights(kernels):
    from gptoss_train.quant.mxfp4 import decode, encode

    torch.manual_seed(2)
    dense = torch.randn(3, 80, 96)  # [E, N out, K in]: K = 3 blocks of 32, the last chunk of 64 half-masked
    blocks, scales = encode(dense)
    weight = decode(blocks, scales, dtype=torch.float32).transpose(-1, -2)  # [E, K, N]
    counts = torch.tensor([2, 0, 17])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tokens = torch.randint(0, 6, (int(counts.sum()),))
    source = torch.randn(6, 96)
    expert = torch.repeat_interleave(torch.arange(3), counts)
    ref = torch.bmm(source[tokens][:, None, :], weight[expert]).squeeze(1)
    got = kernels.expert_gemm_mxfp4(source, blocks, scales, offs, x_rows=tokens)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("triton_experts", [True, False], ids=["expert_gemm", "grouped_mm"])
def test_fused_step_matches_eager_step_across_the_window(kernels, monkeypatch, triton_experts):
    monkeypatch.setattr(kernels, "EXPERT_GEMM_MAX_PAIRS", 512 if triton_experts else 0)
    monkeypatch.setattr(kernels, "ATTENTION_SPLIT_LEN", 16)  # 32 full-attention keys: two splits and the combine

    # Two slots at different positions; 12 steps take both past the sliding window (8): the ring wraps.
    model = _tiny_model()
    prompts = [PROMPTS[0], PROMPTS[1]]
    w, cache_a, first = _prefilled(model, prompts)
    _, cache_b, _ = _prefilled(model, prompts)
    tokens = first.clone()
    positions = torch.tensor([len(p) for p in prompts])
    for _ in range(12):
        kv_len = 32
        ref = decode_step(w, cache_a, tokens, positions, kv_len, use_grouped=True)
        got = decode_step_fused(w, cache_b, tokens, positions, kv_len, use_grouped=True)
        assert float((got - ref).norm() / ref.norm()) < 1e-4
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        for li in range(len(w.layers)):
            assert torch.allclose(cache_a.k[li], cache_b.k[li], atol=1e-5)
            assert torch.allclose(cache_a.v[li], cache_b.v[li], atol=1e-5)
        tokens = ref.argmax(-1)
        positions = positions + 1


def test_fused_step_reads_mxfp4_experts_like_the_decoded_model(kernels):
    from gptoss_train.kernels.moe import attach_mxfp4_experts
    from gptoss_train.quant.mxfp4 import encode

    model = _tiny_model(seed=4)
    with torch.no_grad():
        for layer in model.model.layers:
            packed = []
            for name in ("gate_up_proj", "down_proj"):
                packed += encode(getattr(layer.mlp.experts, name).detach().transpose(-1, -2).contiguous())
            attach_mxfp4_experts(layer.mlp.experts, *packed)
    prompts = [PROMPTS[0], PROMPTS[2]]
    w_dense, cache_a, first = _prefilled(model, prompts)  # experts decoded to a resident copy
    w_mx, cache_b, first_mx = _prefilled(model, prompts, keep_mxfp4=True)  # bytes kept; prefill decodes per layer
    assert w_mx.layers[0].gate_up is None and w_mx.layers[0].gate_up_mx is not None
    assert torch.equal(first, first_mx)
    tokens, positions = first, torch.tensor([len(p) for p in prompts])
    for _ in range(4):
        ref = decode_step(w_dense, cache_a, tokens, positions, 48, use_grouped=True)
        got = decode_step_fused(w_mx, cache_b, tokens, positions, 48, use_grouped=True)
        assert float((got - ref).norm() / ref.norm()) < 1e-4
        tokens, positions = ref.argmax(-1), positions + 1
