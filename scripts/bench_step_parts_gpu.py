#!/usr/bin/env python3
"""Parts of a 20b LoRA training step, timed alone on the GPU (CUDA events, median of 20), to decide changes to the
fast path before a whole-step benchmark (scripts/bench_train.py):

* host link: pinned host <-> GPU copies of one layer's activations; the input-embedding lookup from a table in
  pinned host memory, through the host (ids to the CPU, gather, copy back) and zero-copy (a CUDA view of the table);
* expert products of one layer's backward (4 x 2048 tokens, top-4 of 32 experts, MXFP4 stacks): gate_up in the
  recompute decoded in 512 MiB pieces (outputs concatenated) or whole; dX of gate_up in pieces (summed) or from a
  stack decoded once and kept;
* the four grouped-GEMM shapes of a step (forward and dX of gate_up and down) with the expert stack row- or
  column-major, balanced and randomly routed, against one dense cuBLAS GEMM of the same size (TFLOP/s);
* SwiGLU + routing-weight backward: inductor's kernels for the autograd version against kernels/swiglu.py's fused
  kernel over a few tile shapes (GB/s of the bytes that must move).

    source scripts/device_setup.sh; python scripts/bench_step_parts_gpu.py [host] [experts] [gemm] [swiglu]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_decode_gpu import time_ms  # noqa: E402  (scripts/ is on the path when run as a script)

from gptoss_train.kernels import embedding, moe, swiglu  # noqa: E402

TOKENS, HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, VOCAB = 8192, 2880, 2880, 32, 4, 201088


def host_link() -> None:
    layer = torch.randn(TOKENS * TOP_K, 2 * INTERMEDIATE, dtype=torch.bfloat16, device="cuda")  # a gate_up output
    host = torch.empty(layer.shape, dtype=layer.dtype, pin_memory=True)
    nbytes = layer.numel() * layer.element_size()
    d2h = time_ms(lambda: host.copy_(layer, non_blocking=True))
    h2d = time_ms(lambda: layer.copy_(host, non_blocking=True))
    print(f"pinned copies of {nbytes / 2**20:.0f} MiB: device->host {d2h:.2f} ms ({nbytes / d2h / 1e6:.1f} GB/s), "
          f"host->device {h2d:.2f} ms ({nbytes / h2d / 1e6:.1f} GB/s)", flush=True)

    table = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16).pin_memory()
    ids = torch.randint(0, VOCAB, (4, 2048), device="cuda")
    view = embedding.device_view_of_pinned(table, "cuda")

    def through_host():
        cpu_ids = ids.to("cpu").reshape(-1)
        rows = torch.empty((cpu_ids.numel(), HIDDEN), dtype=table.dtype, pin_memory=True)
        torch.index_select(table, 0, cpu_ids, out=rows)
        return rows.view(4, 2048, HIDDEN).to("cuda", non_blocking=True)

    print(f"embedding lookup of 4 x 2048 ids, table in pinned host memory: through the host "
          f"{time_ms(through_host):.2f} ms", flush=True)
    if view is None:
        print("  zero-copy view: not available", flush=True)
        return
    zero_copy = lambda: torch.nn.functional.embedding(ids, view)  # noqa: E731
    same = torch.equal(zero_copy(), through_host())
    print(f"  zero-copy (CUDA view of the pinned table): {time_ms(zero_copy):.2f} ms, identical rows: {same}",
          flush=True)


def expert_products() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    pairs = TOKENS * TOP_K
    offs = torch.arange(1, EXPERTS + 1, device="cuda", dtype=torch.int32) * (pairs // EXPERTS)
    blocks = torch.randint(0, 256, (EXPERTS, 2 * INTERMEDIATE, HIDDEN // 32, 16), dtype=torch.uint8, device="cuda",
                           generator=gen)
    scales = torch.randint(116, 120, (EXPERTS, 2 * INTERMEDIATE, HIDDEN // 32), dtype=torch.uint8, device="cuda",
                           generator=gen)
    x = torch.randn(pairs, HIDDEN, dtype=torch.bfloat16, device="cuda", generator=gen)
    grad = torch.randn(pairs, 2 * INTERMEDIATE, dtype=torch.bfloat16, device="cuda", generator=gen)

    def product(budget):
        with torch.no_grad():
            return moe._GroupedMMFromMXFP4.apply(x, blocks, scales, offs, budget, False)

    def decode_whole():
        return moe.decode_mxfp4_experts(blocks, scales, torch.bfloat16)

    kept = decode_whole()
    rows = [
        ("decode gate_up stack (whole)", decode_whole),
        ("recompute gate_up, 512 MiB pieces + cat", lambda: product(moe.DECODE_PIECE_BYTES)),
        ("recompute gate_up, whole stack", lambda: product(2**31)),
        ("gate_up product from a kept stack", lambda: moe._grouped_mm(x, kept.transpose(-1, -2), offs, native=True)),
        ("dX of gate_up, 512 MiB pieces (decode each)", lambda: moe._mxfp4_grad_input(grad, blocks, scales, offs)),
        ("dX of gate_up from the kept stack", lambda: moe._grouped_mm(grad, kept, offs, native=True)),
    ]
    for name, fn in rows:
        print(f"{name:<46} {time_ms(fn):>7.3f} ms", flush=True)


def _routed_offsets(kind: str, gen) -> torch.Tensor:
    pairs = TOKENS * TOP_K
    if kind == "balanced":
        return torch.arange(1, EXPERTS + 1, device="cuda", dtype=torch.int32) * (pairs // EXPERTS)
    logits = torch.randn(TOKENS, EXPERTS, device="cuda", generator=gen)
    counts = torch.bincount(logits.topk(TOP_K, dim=-1).indices.reshape(-1), minlength=EXPERTS)
    return torch.cumsum(counts, 0).to(torch.int32)


def grouped_gemm_shapes() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    pairs = TOKENS * TOP_K
    shapes = [  # (product, K, N): [pairs, K] x [E, K, N]
        ("gate_up forward", HIDDEN, 2 * INTERMEDIATE), ("down forward", INTERMEDIATE, HIDDEN),
        ("gate_up dX", 2 * INTERMEDIATE, HIDDEN), ("down dX", HIDDEN, INTERMEDIATE),
    ]
    print(f"{'grouped GEMM [P,K]x[E,K,N]':<24} {'routing':<9} {'stack':<10} {'ms':>7} {'TFLOP/s':>8}  dense mm",
          flush=True)
    for name, k, n in shapes:
        a = torch.randn(pairs, k, dtype=torch.bfloat16, device="cuda", generator=gen)
        row_major = torch.randn(EXPERTS, k, n, dtype=torch.bfloat16, device="cuda", generator=gen)
        col_major = row_major.transpose(-1, -2).contiguous().transpose(-1, -2)
        flops = 2 * pairs * k * n
        dense = time_ms(lambda: a @ row_major[0])
        for routing in ("balanced", "random"):
            offs = _routed_offsets(routing, gen)
            for layout, b in (("row-major", row_major), ("col-major", col_major)):
                ms = time_ms(lambda: torch._grouped_mm(a, b, offs=offs))
                print(f"{name:<24} {routing:<9} {layout:<10} {ms:>7.3f} {flops / ms / 1e9:>8.0f}  "
                      f"{dense:.3f} ms {flops / dense / 1e9:.0f}", flush=True)
        del a, row_major, col_major


def swiglu_backward() -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    pairs = TOKENS * TOP_K
    gate_up = torch.randn(pairs, 2 * INTERMEDIATE, dtype=torch.bfloat16, device="cuda", generator=gen) * 2
    bias = torch.randn(EXPERTS, 2 * INTERMEDIATE, dtype=torch.bfloat16, device="cuda", generator=gen) * 0.1
    experts = torch.repeat_interleave(torch.arange(EXPERTS, device="cuda"), pairs // EXPERTS)
    grad = torch.randn(pairs, INTERMEDIATE, dtype=torch.bfloat16, device="cuda", generator=gen)
    weights = torch.rand(pairs, dtype=torch.bfloat16, device="cuda", generator=gen)
    alpha, limit = 1.702, 7.0
    nbytes = 2 * (2 * gate_up.numel() + grad.numel())

    forward = torch.compile(swiglu.bias_swiglu)
    row_dot = torch.compile(lambda g, a: (g.float() * a.float()).sum(-1))

    def autograd_version():  # the recompute's SwiGLU forward, autograd's backward of it, the routing-weight dot
        u = gate_up.detach().requires_grad_()
        act = forward(u, bias, experts, alpha, limit)
        weight_grad = row_dot(grad, act)
        act.backward(grad * weights[:, None])
        return u.grad, weight_grad

    reference = swiglu.swiglu_routed_backward_reference(gate_up, bias, experts, grad, weights, alpha, limit)
    got = autograd_version()
    print(f"SwiGLU + routing-weight backward ({nbytes / 1e9:.2f} GB to move)", flush=True)
    ms = time_ms(autograd_version)
    print(f"  inductor (forward, backward, dot)     {ms:>7.3f} ms {nbytes / ms / 1e6:>6.0f} GB/s  max err vs fp32 "
          f"{(got[0].float() - reference[0].float()).abs().max().item():.3g}", flush=True)
    for config in ((8, 128, 4), (4, 256, 4), (8, 256, 8), (16, 128, 8), (16, 64, 4), (2, 512, 4), (32, 64, 8)):
        run = lambda: swiglu._launch_backward(gate_up, bias, experts, grad, weights, alpha, limit,  # noqa: E731
                                              lambda kernel: kernel, config)
        got = run()
        error = max((got[0].float() - reference[0].float()).abs().max().item(),
                    (got[1] - reference[1]).abs().max().item())
        ms = time_ms(run)
        print(f"  fused kernel rows/cols/warps {config!s:<12} {ms:>7.3f} ms {nbytes / ms / 1e6:>6.0f} GB/s  "
              f"max err {error:.3g}", flush=True)


def main() -> int:
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__}", flush=True)
    parts = sys.argv[1:] or ["host", "experts", "gemm", "swiglu"]
    for part, fn in (("host", host_link), ("experts", expert_products), ("gemm", grouped_gemm_shapes),
                     ("swiglu", swiglu_backward)):
        if part in parts:
            fn()
    return 0


if __name__ == "__main__":
    sys.exit(main())
