"""Benchmark the MXFP4 codec on every expert matrix of a gpt-oss shape (decode to bf16, then encode back).

    python scripts/bench_mxfp4.py                          # 20b shapes on the CPU (all 24 layers x 32 experts)
    python scripts/bench_mxfp4.py --device cuda            # same on the GPU
    python scripts/bench_mxfp4.py --preset tiny            # smoke test
    python scripts/bench_mxfp4.py --layers 2               # a subset (the table then also extrapolates to all)
    python scripts/bench_mxfp4.py --threads 2 --json /tmp/codec.json   # the CPU acceptance run (issue 3: < 60 s)

20b: 24 layers x 32 experts x (5760x2880 gate_up + 2880x2880 down) = 19.1 G weights. Each layer's bytes are random
(uniform codes, scale bytes 117-122, i.e. values of the size real weights have), decoded to bf16 in the checkpoint
orientation [E, out, in] and encoded back with the chosen rule; the first layer also checks that the round trip
gives the same values. ``--data rescaled`` rescales each row first (see DATA), which is the slower case for `best`. Times exclude making the random bytes. Prints a table and, with --json, writes the numbers.

On a shared machine wall time also measures the other processes: the table gives process CPU time (all threads) and
the load average at start and end beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptoss_train.model.tiny import preset_config  # noqa: E402
from gptoss_train.quant import mxfp4  # noqa: E402


def expert_shapes(preset: str) -> tuple[int, list[tuple[str, tuple[int, int, int]]]]:
    cfg = preset_config(preset)
    experts, hidden, inter = cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"]
    return cfg["num_hidden_layers"], [("gate_up_proj", (experts, 2 * inter, hidden)), ("down_proj", (experts, hidden, inter))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


DATA = ("mxfp4", "rescaled")


def run_codec_benchmark(preset: str = "20b", device: str = "cpu", layers: int | None = None, rule: str = "best",
                        seed: int = 0, verbose: bool = True, kernel: str | None = None, data: str = "mxfp4",
                        reuse_outputs: bool = False) -> dict:
    """Decode + encode every expert matrix of ``preset`` (or the first ``layers`` layers); returns timings."""
    device = torch.device(device)
    total_layers, shapes = expert_shapes(preset)
    run_layers = min(layers or total_layers, total_layers)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sources = {}
    for name, (e, rows, cols) in shapes:
        blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
        scales = torch.randint(117, 123, (e, rows, cols // 32), dtype=torch.uint8, generator=gen)
        sources[name] = (blocks.to(device), scales.to(device))
    # "rescaled": every row times a factor in [0.75, 1.25) before encoding, as after fine-tuning: block maxima leave
    # the E2M1 grid, so `best` has to quantize and compare both rules in about half the blocks (on "mxfp4" data,
    # whose block maximum is almost always exactly 6 * 2**s, it hardly ever does)
    row_factors = {name: (0.75 + 0.5 * torch.rand(e, rows, 1, generator=gen)).to(torch.bfloat16).to(device)
                   for name, (e, rows, _) in shapes} if data == "rescaled" else None
    # reuse_outputs: one set of output tensors per matrix shape, written again for every layer (out=): measures the
    # codec without the operating system's cost of handing out fresh (zeroed) pages for every output
    outputs = {}
    if reuse_outputs:
        for name, (e, rows, cols) in shapes:
            outputs[name] = (torch.empty(e, rows, cols, dtype=torch.bfloat16, device=device),
                             (torch.empty(e, rows, cols // 32, 16, dtype=torch.uint8, device=device),
                              torch.empty(e, rows, cols // 32, dtype=torch.uint8, device=device)))
    decode_s = encode_s = 0.0
    decode_cpu = encode_cpu = 0.0  # process CPU time (all threads): on a shared machine wall time mostly measures others
    elements = 0
    checked = False
    # warm-up on one expert (tables, CUDA context, the native CPU kernel's one-off build, and the torch.compile'd
    # kernels that big CUDA tensors use: compiled once per process, cached on disk by inductor); reported separately
    load_start = _load_average()
    t0 = time.perf_counter()
    warm = kernel or ("compiled" if device.type == "cuda" else None)
    for blocks, scales in sources.values():
        mxfp4.encode(mxfp4.decode(blocks[:1], scales[:1], kernel=warm), rule=rule, kernel=warm)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    # what kernel=None resolves to for these sizes (on CPU without the native kernel decode stays eager)
    decode_kernel = mxfp4._pick_kernel(kernel, device, 1 << 30, compile_on_cpu=False)
    encode_kernel = mxfp4._pick_kernel(kernel, device, 1 << 30, compile_on_cpu=True)
    used = decode_kernel if decode_kernel == encode_kernel else f"decode {decode_kernel}, encode {encode_kernel}"
    for layer in range(run_layers):
        for name, (blocks, scales) in sources.items():
            t0, c0 = time.perf_counter(), time.process_time()
            dense_out, codes_out = outputs.get(name, (None, None))
            dense = mxfp4.decode(blocks, scales, dtype=torch.bfloat16, kernel=kernel, out=dense_out)
            _sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            if row_factors is not None:  # not timed
                dense.mul_(row_factors[name])
                _sync(device)
                t1, c1 = time.perf_counter(), time.process_time()
            new_blocks, new_scales = mxfp4.encode(dense, rule=rule, kernel=kernel, out=codes_out)
            _sync(device)
            t2, c2 = time.perf_counter(), time.process_time()
            decode_s += t1 - t0
            encode_s += t2 - t1
            decode_cpu += c1 - c0
            encode_cpu += c2 - c1
            elements += dense.numel()
            if not checked and row_factors is None:
                again = mxfp4.decode(new_blocks, new_scales, dtype=torch.bfloat16)
                if not torch.equal(again, dense):
                    raise SystemExit(f"round trip changed values in {name}: codec bug")
            del dense, new_blocks, new_scales
        checked = True
        if verbose:
            print(f"layer {layer + 1}/{run_layers}: decode {decode_s:.2f} s, encode {encode_s:.2f} s so far", flush=True)
    scale_to_all = total_layers / run_layers
    return {
        "preset": preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {_cpu_model()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rule": rule,
        "data": data,
        "outputs": "reused (out=)" if reuse_outputs else "new tensors",
        "layers_run": run_layers,
        "layers_total": total_layers,
        "elements": elements,
        "kernel": f"{used} ({'auto' if kernel is None else 'forced'})",
        "load_average_start": load_start,
        "load_average_end": _load_average(),
        "cpu_s": decode_cpu + encode_cpu,
        "warmup_s": warmup_s,
        "decode_s": decode_s,
        "encode_s": encode_s,
        "total_s": decode_s + encode_s,
        "total_s_all_layers": (decode_s + encode_s) * scale_to_all,
        "decode_cpu_s": decode_cpu,
        "encode_cpu_s": encode_cpu,
        "cpu_s_all_layers": (decode_cpu + encode_cpu) * scale_to_all,
        "decode_gelem_per_s": elements / decode_s / 1e9,
        "encode_gelem_per_s": elements / encode_s / 1e9,
        # bf16 bytes produced by decode / consumed by encode per second
        "decode_bf16_gb_per_s": 2 * elements / decode_s / 1e9,
        "encode_bf16_gb_per_s": 2 * elements / encode_s / 1e9,
    }


def print_table(result: dict) -> None:
    rows = [
        ("device", result["device"]),
        ("torch", f"{result['torch']}, {result['threads']} threads"),
        ("shape", f"{result['preset']}: {result['layers_run']}/{result['layers_total']} layers, {result['elements'] / 1e9:.2f} G weights"),
        ("rule, data, outputs", f"{result['rule']}, {result['data']}, {result['outputs']}"),
        ("kernel", result["kernel"]),
        ("warm-up (incl. build/compile)", f"{result['warmup_s']:.1f} s"),
        ("decode (bf16)", f"{result['decode_s']:.2f} s  ({result['decode_gelem_per_s']:.2f} G weights/s, {result['decode_bf16_gb_per_s']:.2f} GB/s bf16 out)"),
        ("encode", f"{result['encode_s']:.2f} s  ({result['encode_gelem_per_s']:.2f} G weights/s, {result['encode_bf16_gb_per_s']:.2f} GB/s bf16 in)"),
        ("decode + encode", f"{result['total_s']:.2f} s wall"),
        ("process CPU time", f"{result['cpu_s']:.2f} s (decode {result['decode_cpu_s']:.2f} s, encode {result['encode_cpu_s']:.2f} s; all threads)"),
        ("load average start / end", f"{result['load_average_start']} / {result['load_average_end']}"),
    ]
    if result["layers_run"] != result["layers_total"]:
        rows.append(("all layers (extrapolated)", f"{result['total_s_all_layers']:.1f} s wall, {result['cpu_s_all_layers']:.1f} s CPU"))
    width = max(len(k) for k, _ in rows)
    print("\nMXFP4 codec benchmark")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=None, help="run only the first N layers")
    parser.add_argument("--rule", default="best", choices=list(mxfp4.RULES))
    parser.add_argument("--data", default="mxfp4", choices=list(DATA),
                        help="mxfp4: decoded random codes; rescaled: rows rescaled after decoding (the `best` rule's "
                             "costly case, like fine-tuned weights)")
    parser.add_argument("--reuse-outputs", action="store_true",
                        help="decode/encode into the same output tensors every layer (out=): the codec's own cost, "
                             "without the OS zeroing fresh pages for ~50 GB of new outputs")
    parser.add_argument("--kernel", default=None, choices=list(mxfp4.KERNELS),
                        help="codec implementation (default: native C kernel on CPU, torch.compile'd on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_codec_benchmark(args.preset, args.device, args.layers, args.rule, kernel=args.kernel, data=args.data,
                                 reuse_outputs=args.reuse_outputs)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
