#!/usr/bin/env python3
"""GPU MXFP4 -> bf16 decode of a 20b expert stack (kernels/mxfp4_decode.py): whole and in row pieces, per launch
configuration; effective bandwidth = bytes read + written over kernel time (CUDA events, median of 20).

    source scripts/device_setup.sh; python scripts/bench_decode_gpu.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptoss_train.kernels import moe, mxfp4_decode  # noqa: E402


def time_ms(fn, reps: int = 20) -> float:
    """Median GPU time of ``fn`` in ms over ``reps`` runs after 3 warm-up runs (CUDA events). The other GPU
    microbenchmarks in scripts/ import it from here."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    generator = torch.Generator(device="cuda").manual_seed(0)
    stacks = {"gate_up [32, 5760, 2880]": (32, 5760, 2880), "down [32, 2880, 2880]": (32, 2880, 2880)}
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__}")
    print(f"{'stack':<26} {'piece MiB':>9} {'block':>6} {'warps':>5} {'ms/stack':>9} {'TB/s':>6}")
    for name, (experts, rows, cols) in stacks.items():
        blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8, device="cuda",
                               generator=generator)
        scales = torch.randint(116, 120, (experts, rows, cols // 32), dtype=torch.uint8, device="cuda",
                               generator=generator)
        moved = blocks.numel() + scales.numel() + 2 * experts * rows * cols
        for piece_mib in (256, 512, 1024):
            pieces = moe._row_pieces(blocks, torch.bfloat16, piece_mib * 2**20)
            for block, warps in ((2048, 8), (4096, 8), (1024, 4), (8192, 16)):
                mxfp4_decode.DECODE_BLOCK, mxfp4_decode.DECODE_WARPS = block, warps

                def decode_all():
                    for rows_range in pieces:
                        mxfp4_decode._launch_decode(blocks, scales, torch.bfloat16, rows_range[0],
                                                    rows_range[1] - rows_range[0], lambda kernel: kernel)

                ms = time_ms(decode_all)
                print(f"{name:<26} {piece_mib:>9} {block:>6} {warps:>5} {ms:>9.3f} {moved / ms / 1e9:>6.2f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
