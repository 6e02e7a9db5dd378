"""The experts' SwiGLU and routing weight, differentiated in one pass: backward of a layer's recompute (moe.py).

Per routed pair p (expert e, routing weight w_p), with gate/up interleaved in the gate_up product's columns
(GptOssExperts._apply_gate):

    gate = min(u_2j + c_e,2j, limit),  up = clamp(u_2j+1 + c_e,2j+1, -limit, limit)
    act_j = (up + 1) * gate * sigmoid(alpha * gate)
    out_p = w_p * (act @ W_e + ...)

Given G_p = dL/d(act @ W_e + ...) (the down projection's dX, before the routing weight), backward needs

    dL/dw_p = <G_p, act_p>       and       dL/du_p = SwiGLU'(u_p + c_e) · (w_p G_p)

Why a kernel of our own: inside the compiled layer, inductor split this into a pointwise kernel (SwiGLU backward,
0.67 ms a layer on the H100) and a reduction that recomputes ``act`` (0.52 ms), plus the SwiGLU forward of the
recompute pass (0.32 ms) whose output only feeds them: 1.5 ms where the bytes (read u and G, write dL/du: 0.94 GB at
20b shapes) take ~0.35 ms at the H100's bandwidth. Here one pass reads u and G once, computes ``act`` in registers
(float32) and writes dL/du and dL/dw.

``swiglu_routed_backward`` runs the Triton kernel for CUDA tensors and the same math in torch elsewhere (CPU tests,
machines without Triton); the two are compared under Triton's CPU interpreter (tests/kernels/test_swiglu.py).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch math below
    triton = None


def bias_swiglu(gate_up: torch.Tensor, bias: torch.Tensor, experts: torch.Tensor, alpha: float,
                limit: float) -> torch.Tensor:
    """act = SwiGLU(gate_up + bias[experts]) as GptOssExperts._apply_gate computes it (interleaved gate/up, clamped,
    (up + 1) * gate * sigmoid(alpha * gate)), in gate_up's dtype. Fused into one kernel by torch.compile on CUDA."""
    gate_up = gate_up + bias[experts].to(gate_up.dtype)
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def swiglu_routed_backward_reference(gate_up, bias, experts, grad, weights, alpha: float, limit: float):
    """(dL/d gate_up [P, 2I] in gate_up's dtype, dL/dw [P] float32): the torch statement of the kernel, float32."""
    pre = gate_up.float() + bias.float()[experts]
    gate, up = pre[:, ::2], pre[:, 1::2]
    gate_c, up_c = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    sig = torch.sigmoid(alpha * gate_c)
    glu = gate_c * sig
    grad = grad.float()
    weight_grad = (grad * ((up_c + 1) * glu)).sum(-1)
    grad_act = grad * weights.float()[:, None]
    # clamp passes the gradient where min <= x <= max (torch's convention, bounds included)
    grad_up = torch.where((up >= -limit) & (up <= limit), grad_act * glu, 0.0)
    grad_gate = torch.where(gate <= limit, grad_act * (up_c + 1) * sig * (1 + alpha * gate_c * (1 - sig)), 0.0)
    return torch.stack((grad_gate, grad_up), dim=-1).view(gate_up.shape).to(gate_up.dtype), weight_grad


if triton is not None:

    @triton.jit
    def _swiglu_routed_backward_kernel(gate_up_ptr, bias_ptr, experts_ptr, grad_ptr, weights_ptr, grad_gate_up_ptr,
                                       weight_grad_ptr, rows, alpha: tl.constexpr, limit: tl.constexpr,
                                       width: tl.constexpr,
                                       BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        # Program i: rows [i*BLOCK_ROWS, ...), all `width` act columns in chunks of BLOCK_COLS (2*BLOCK_COLS
        # interleaved gate/up columns, loaded and stored contiguously). `width` (the intermediate size), alpha and
        # limit are compile-time constants: one model has one of each (and a compiled graph would otherwise pass
        # the floats as fp64, which the loop-carried fp32 sum must not meet).
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = row < rows
        row64 = row.to(tl.int64)
        expert = tl.load(experts_ptr + row, mask=row_ok, other=0).to(tl.int64)
        weight = tl.load(weights_ptr + row, mask=row_ok, other=0).to(tl.float32)
        dot = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for start in range(0, width, BLOCK_COLS):
            pair_col = 2 * start + tl.arange(0, 2 * BLOCK_COLS)  # interleaved columns of gate_up
            pair_mask = row_ok[:, None] & (pair_col < 2 * width)[None, :]
            pair_offsets = row64[:, None] * (2 * width) + pair_col[None, :]
            pre = (tl.load(gate_up_ptr + pair_offsets, mask=pair_mask, other=0).to(tl.float32)
                   + tl.load(bias_ptr + expert[:, None] * (2 * width) + pair_col[None, :], mask=pair_mask,
                             other=0).to(tl.float32))
            gate, up = tl.split(tl.reshape(pre, [BLOCK_ROWS, BLOCK_COLS, 2]))
            col = start + tl.arange(0, BLOCK_COLS)
            mask = row_ok[:, None] & (col < width)[None, :]
            grad = tl.load(grad_ptr + row64[:, None] * width + col[None, :], mask=mask, other=0).to(tl.float32)
            gate_c = tl.minimum(gate, limit)
            up_c = tl.minimum(tl.maximum(up, -limit), limit)
            sig = tl.sigmoid(alpha * gate_c)
            glu = gate_c * sig
            dot += tl.sum(grad * ((up_c + 1) * glu), axis=1)
            grad_act = grad * weight[:, None]
            grad_up = tl.where((up >= -limit) & (up <= limit), grad_act * glu, 0.0)
            grad_gate = tl.where(gate <= limit, grad_act * (up_c + 1) * sig * (1 + alpha * gate_c * (1 - sig)), 0.0)
            tl.store(grad_gate_up_ptr + pair_offsets,
                     tl.interleave(grad_gate, grad_up).to(grad_gate_up_ptr.dtype.element_ty), mask=pair_mask)
        tl.store(weight_grad_ptr + row, dot, mask=row_ok)


# Rows and act columns per program, warps per program: on the H100 at 20b shapes (32,768 pairs, width 2,880) 0.401 ms
# (2.35 TB/s) against 0.40-0.47 ms for 6 other shapes (scripts/bench_step_parts_gpu.py swiglu).
BLOCK_ROWS, BLOCK_COLS, WARPS = 4, 256, 4


def _launch_backward(gate_up, bias, experts, grad, weights, alpha: float, limit: float, launch,
                     config: tuple[int, int, int] | None = None):
    block_rows, block_cols, warps = config or (BLOCK_ROWS, BLOCK_COLS, WARPS)
    gate_up, bias, grad = gate_up.contiguous(), bias.contiguous(), grad.contiguous()
    rows, width = grad.shape
    grad_gate_up = torch.empty_like(gate_up)
    weight_grad = torch.empty(rows, dtype=torch.float32, device=gate_up.device)
    launch(_swiglu_routed_backward_kernel)[(triton.cdiv(rows, block_rows),)](
        gate_up, bias, experts.contiguous(), grad, weights.contiguous(), grad_gate_up, weight_grad, rows,
        alpha=float(alpha), limit=float(limit), width=width, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps)
    return grad_gate_up, weight_grad


# The kernel as a ``torch.library.triton_op``, registered at import (not inside a graph dynamo is tracing): a compiled
# decoder layer traces through it as one op instead of breaking its graph. None without Triton or triton_op.
_backward_op = None
if triton is not None and hasattr(torch.library, "triton_op"):

    @torch.library.triton_op("gptoss_train::swiglu_routed_backward", mutates_args=())
    def _backward_op(gate_up: torch.Tensor, bias: torch.Tensor, experts: torch.Tensor, grad: torch.Tensor,
                     weights: torch.Tensor, alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_backward(gate_up, bias, experts, grad, weights, alpha, limit, torch.library.wrap_triton)


def swiglu_routed_backward(gate_up: torch.Tensor, bias: torch.Tensor, experts: torch.Tensor, grad: torch.Tensor,
                           weights: torch.Tensor, alpha: float, limit: float):
    """gate_up [P, 2I] (the gate_up product, before its bias), bias [E, 2I], experts [P] (each pair's expert),
    grad [P, I] (G above), weights [P] -> (dL/d gate_up [P, 2I] in gate_up's dtype, dL/dw [P] float32)."""
    if triton is None or not gate_up.is_cuda:
        return swiglu_routed_backward_reference(gate_up, bias, experts, grad, weights, alpha, limit)
    if _backward_op is not None:
        return _backward_op(gate_up, bias, experts, grad, weights, alpha, limit)
    return _launch_backward(gate_up, bias, experts, grad, weights, alpha, limit, lambda kernel: kernel)
