"""kernels/swiglu.py: the fused SwiGLU + routing-weight backward against autograd, and its Triton kernel against the
torch statement (under Triton's CPU interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gptoss_train.kernels.swiglu import bias_swiglu, swiglu_routed_backward, swiglu_routed_backward_reference

ALPHA, LIMIT = 1.702, 1.5  # a small limit puts many values beyond the clamps


def _case(rows=37, width=200, experts=5, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(rows, 2 * width, generator=generator) * 1.5).to(dtype)
    gate_up[0, :8] = torch.tensor([LIMIT, LIMIT, -LIMIT, -LIMIT, 0.0, 0.0, LIMIT + 1, -LIMIT - 1])  # on the bounds
    bias = (torch.randn(experts, 2 * width, generator=generator) * 0.1).to(dtype)
    bias[:, :8] = 0
    sorted_experts = torch.sort(torch.randint(0, experts, (rows,), generator=generator)).values
    grad = torch.randn(rows, width, generator=generator).to(dtype)
    weights = torch.rand(rows, generator=generator).to(dtype)
    return gate_up, bias, sorted_experts, grad, weights


def test_reference_is_autograd_of_the_weighted_swiglu():
    """d/du and d/dw of sum(G * w * SwiGLU(u + c_e)) as autograd computes them through bias_swiglu (GptOssExperts'
    clamps included: values on the bounds pass the gradient, beyond them not)."""
    gate_up, bias, sorted_experts, grad, weights = _case(dtype=torch.float64)
    u = gate_up.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    act = bias_swiglu(u, bias, sorted_experts, ALPHA, LIMIT)
    (act * w[:, None] * grad).sum().backward()
    grad_gate_up, weight_grad = swiglu_routed_backward_reference(gate_up, bias, sorted_experts, grad, weights, ALPHA,
                                                                 LIMIT)
    assert grad_gate_up.dtype == gate_up.dtype and weight_grad.dtype == torch.float32
    torch.testing.assert_close(grad_gate_up, u.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight_grad.double(), w.grad, rtol=1e-5, atol=1e-5)
    assert (grad_gate_up == 0).any() and (grad_gate_up != 0).float().mean() > 0.3  # clamps were exercised


def test_cpu_tensors_take_the_torch_statement():
    case = _case(rows=5, width=16)
    got = swiglu_routed_backward(*case, ALPHA, LIMIT)
    expected = swiglu_routed_backward_reference(*case, ALPHA, LIMIT)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


_TRITON_CHECK = """
import torch
from gptoss_train.kernels import swiglu
from test_swiglu import _case, ALPHA, LIMIT
for dtype, rows, width, tol in ((torch.float32, 37, 600, 1e-6), (torch.bfloat16, 19, 128, 1e-2)):
    case = _case(rows=rows, width=width, dtype=dtype)
    got = swiglu._launch_backward(*case, ALPHA, LIMIT, lambda kernel: kernel)
    expected = swiglu.swiglu_routed_backward_reference(*case, ALPHA, LIMIT)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_triton_kernel_under_the_interpreter():
    """The CUDA kernel (row and column tails included: 37 rows, 600 columns in chunks of 256) computes the torch
    statement; Triton's CPU interpreter runs it (switched on before Triton is imported, hence the subprocess)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_kernel_compiles_for_hopper():
    """Through Triton's whole compiler for sm_90 (no GPU needed), bf16 and float32, at the 20b/120b width: the
    interpreter does not check what the compiler rejects."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gptoss_train.kernels import swiglu

    fn = swiglu._swiglu_routed_backward_kernel
    constants = dict(alpha=1.702, limit=7.0, width=2880, BLOCK_ROWS=swiglu.BLOCK_ROWS, BLOCK_COLS=swiglu.BLOCK_COLS)
    for data in ("*bf16", "*fp32"):
        signature = dict(gate_up_ptr=data, bias_ptr=data, experts_ptr="*i64", grad_ptr=data, weights_ptr=data,
                         grad_gate_up_ptr=data, weight_grad_ptr="*fp32", rows="i32",
                         **{name: "constexpr" for name in constants})
        constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
