#!/usr/bin/env python3
"""Parts of a 20b LoRA training step, timed alone on the GPU (CUDA events, median of 20), to decide changes to the
fast path before a whole-step benchmark (scripts/bench_train.py):

* host link: pinned host <-> GPU copies of one layer's activations; the input-embedding lookup from a table in
  pinned host memory, through the host (ids to the CPU, gather, copy back) and zero-copy (a CUDA view of the table);
* expert products of one layer's backward (4 x 2048 tokens, top-4 of 32 experts, MXFP4 stacks): gate_up in the
  recompute decoded in 512 MiB pieces (outputs concatenated) or whole; dX of gate_up in pieces (summed) or from a
  stack decoded once and kept.

    source scripts/device_setup.sh; python scripts/bench_step_parts_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_decode_gpu import time_ms  # noqa: E402  (scripts/ is on the path when run as a script)

from gptoss_train.kernels import embedding, moe  # noqa: E402

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


def main() -> int:
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__}", flush=True)
    host_link()
    expert_products()
    return 0


if __name__ == "__main__":
    sys.exit(main())
