#!/usr/bin/env python
"""Time ``gptoss-export`` on a 20b-shaped checkpoint + a LoRA adapter (attention + every expert, r=8).

On the GPU machine (target: each export under 2 minutes)::

    source scripts/device_setup.sh
    python scripts/bench_export.py --preset 20b --device cuda --work /tmp/bench_export --json $OUT/bench_export.json

CPU smoke run on the tiny preset (what the test runs)::

    python scripts/bench_export.py --preset tiny --device cpu --work /tmp/bench_tiny

Steps: build a random checkpoint in the hub layout (``gptoss_train.model.tiny.build_checkpoint``; not timed), write a
random LoRA adapter for it (every adapter matrix non-zero, so every expert changes: the worst case for
requantization; not timed), then time ``export_model(..., adapter=...)`` to MXFP4 and to GGUF separately. Each
export includes loading the base, merging the adapter, requantizing, writing and (mxfp4) validating.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch


def write_random_adapter(base: Path, out: Path, *, r: int = 8, seed: int = 0) -> Path:
    """A PEFT adapter for ``base`` with random non-zero A and B (built on the meta device: no base weights loaded)."""
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import GptOssForCausalLM

    from gptoss_train.model.load import build_config
    from gptoss_train.model.lora import lora_config

    config = build_config(json.loads((base / "config.json").read_text()))
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    peft_model = get_peft_model(model, lora_config(r=r, alpha=2 * r, attention=True, experts=True))
    shapes = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(peft_model).items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        # A ~ 1/sqrt(in) like kaiming; B small: a delta of about 1% of the weights, like a short fine-tune
        std = shape[-1] ** -0.5 if "lora_A" in name else 2e-3
        tensors[name] = (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_export"))
    parser.add_argument("--formats", nargs="+", default=["mxfp4", "gguf"], choices=["mxfp4", "bf16", "gguf"])
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers override (quick real-width runs)")
    parser.add_argument("--experts", type=int, default=None, help="num_local_experts override")
    parser.add_argument("--json", type=Path, default=None, help="write the timings here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the exports (they are deleted by default)")
    args = parser.parse_args()

    from gptoss_train.export import export_model
    from gptoss_train.model.tiny import build_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    overrides = {}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    if args.experts:
        overrides["num_local_experts"] = args.experts
        overrides["num_experts_per_tok"] = min(4, args.experts)
    suffix = "".join(f"-{k.split('_')[1]}{v}" for k, v in overrides.items() if k != "num_experts_per_tok")
    base = args.work / f"base-{args.preset}{suffix}"
    started = time.perf_counter()
    if not (base / "config.json").is_file():
        build_checkpoint(base, preset=args.preset, seed=0, **overrides)
    build_seconds = time.perf_counter() - started
    adapter = write_random_adapter(base, args.work / "adapter")
    results = {
        "preset": args.preset,
        "overrides": overrides,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "build_checkpoint_s": round(build_seconds, 1),
        "exports": {},
    }
    for fmt in args.formats:
        out = args.work / (f"export-{fmt}.gguf" if fmt == "gguf" else f"export-{fmt}")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        summary = {}
        path = export_model(base, adapter=adapter, out_dir=out, format=fmt, force=True, device=args.device,
                            on_report=lambda report: summary.update(report.summary()))
        seconds = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() \
            else Path(path).stat().st_size
        results["exports"][fmt] = {"seconds": round(seconds, 1), "bytes": size, "requantize": summary}
        print(f"{fmt}: {seconds:.1f} s, {size / 1e9:.2f} GB, experts changed "
              f"{summary.get('experts_changed')}/{summary.get('experts')}", flush=True)
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True) if Path(path).is_dir() else Path(path).unlink()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if torch.cuda.is_available():
        results["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
