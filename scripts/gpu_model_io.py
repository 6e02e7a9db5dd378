"""GPU check of model I/O: a 20b-shaped random checkpoint loaded with MXFP4-resident experts, one LoRA training step.

    source scripts/device_setup.sh; python scripts/gpu_model_io.py                 # 20b shape, 4 x 2048 tokens
    python scripts/gpu_model_io.py --preset tiny --device cpu --batch 1 --seq 32    # CPU smoke test

Steps (each timed): build the checkpoint with ``build_checkpoint(preset=20b)`` (skipped when --checkpoint already
holds one); ``load_model(experts="mxfp4")`` on the device; LoRA (r=8, attention + every expert) through PEFT;
forward + backward on a random batch under gradient checkpointing (two steps: warm-up, then the measured one);
the MXFP4 codec benchmark on all expert matrices of the preset. Prints peak memory
(``torch.cuda.max_memory_allocated``) against the checkpoint's size on disk and a summary table; --json writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 1024**3


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device) -> float:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20b", choices=["tiny", "20b", "120b"])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: /tmp/gptoss-random-<preset>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--experts", default="mxfp4", choices=["mxfp4", "bf16"])
    parser.add_argument("--fast-experts", action="store_true",
                        help="route the MoE through gptoss_train.kernels.moe (grouped GEMMs) if available")
    parser.add_argument("--skip-codec", action="store_true", help="do not run the codec benchmark")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from gptoss_train.harmony.encoding import ensure_vocab_env

    ensure_vocab_env()
    from peft import get_peft_model

    from gptoss_train.model.load import load_model
    from gptoss_train.model.lora import describe_adapted, lora_config
    from gptoss_train.model.tiny import build_checkpoint

    device = torch.device(args.device)
    results: dict = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "experts": args.experts}
    import peft
    import transformers

    results["transformers"], results["peft"] = transformers.__version__, peft.__version__

    checkpoint = args.checkpoint or Path(f"/tmp/gptoss-random-{args.preset}")
    t0 = time.perf_counter()
    if not (checkpoint / "config.json").is_file():
        # no tokenizer files: the step uses random ids, and building the tokenizer needs the o200k vocabulary
        build_checkpoint(checkpoint, preset=args.preset, seed=0, progress=True, tokenizer=False)
        results["build_s"] = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    results["checkpoint_gib"] = disk / GIB
    print(f"checkpoint {checkpoint}: {disk / GIB:.2f} GiB of safetensors", flush=True)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = load_model(checkpoint, experts=args.experts, dtype=dtype, device=device)
    _sync(device)
    results["load_s"] = time.perf_counter() - t0
    results["after_load_gib"] = _memory(device)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(r=args.rank, alpha=2 * args.rank))
    adapted = describe_adapted(model)
    results["adapted_expert_tensors"] = sum(1 for t in adapted if t.group == "experts")
    results["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.fast_experts:
        try:
            from gptoss_train.kernels.moe import install_fast_experts

            results["fast_expert_layers"] = install_fast_experts(model)
        except ImportError as err:
            print(f"--fast-experts unavailable: {err}")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()

    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, 199998, (args.batch, args.seq), generator=gen).to(device)
    step_times = []
    for step in range(2):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        _sync(device)
        step_times.append(time.perf_counter() - t0)
        # lora_B starts at zero, so at the first step only the B factors get a gradient: each must be non-zero
        expert_b = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora_B" in n]
        if not expert_b or any(g is None or not torch.isfinite(g).all() or g.abs().sum() == 0 for g in expert_b):
            raise SystemExit("an expert LoRA tensor got no (finite) gradient")
        model.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f}, {step_times[-1]:.2f} s", flush=True)
    results["loss"] = float(loss.item())
    results["step_s"] = step_times[-1]
    results["tokens_per_s"] = args.batch * args.seq / step_times[-1]
    results["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
    # what the logits alone need: bf16 logits + the float32 copy the loss makes
    results["logits_gib"] = args.batch * args.seq * vocab * (2 + 4) / GIB
    del model, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.skip_codec:
        from bench_mxfp4 import print_table, run_codec_benchmark

        codec = run_codec_benchmark(args.preset, str(device), verbose=False)
        print_table(codec)
        results["codec"] = codec

    rows = [
        ("device", results["device"]),
        ("versions", f"torch {results['torch']}, transformers {results['transformers']}, peft {results['peft']}"),
        ("checkpoint (MXFP4 experts) on disk", f"{results['checkpoint_gib']:.2f} GiB"),
        ("load (experts=%s)" % args.experts, f"{results['load_s']:.1f} s, {results['after_load_gib']:.2f} GiB resident"),
        ("LoRA", f"r={args.rank}, {results['adapted_expert_tensors']} expert tensors, {results['trainable_params']:,} params"),
        ("batch", f"{args.batch} x {args.seq} tokens, gradient checkpointing"),
        ("step (fwd+bwd)", f"{results['step_s']:.2f} s, {results['tokens_per_s']:,.0f} tokens/s"),
        ("peak memory", f"{results['peak_gib']:.2f} GiB (logits alone ~{results['logits_gib']:.1f} GiB)"),
    ]
    if "build_s" in results:
        rows.insert(2, ("build checkpoint", f"{results['build_s']:.1f} s"))
    if "codec" in results:
        c = results["codec"]
        rows.append(("codec decode+encode (all experts)", f"{c['total_s']:.2f} s (decode {c['decode_s']:.2f}, encode {c['encode_s']:.2f})"))
    width = max(len(k) for k, _ in rows)
    print("\nmodel I/O on the device")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
