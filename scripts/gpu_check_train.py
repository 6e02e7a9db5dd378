#!/usr/bin/env python3
"""Numerics of the fast training path on CUDA: loss and LoRA gradients vs the transformers eager reference.

    source scripts/device_setup.sh && python scripts/gpu_check_train.py [--layers 4] [--seq 1024]

Same random weights (a gpt-oss-20b-shaped model cut to --layers layers; experts are random MXFP4 bytes, decoded
to dense bf16 for the reference and left MXFP4-resident for the fast path), same LoRA (attention + every expert,
random A and B so every factor gets gradient), same batch. Three runs: eager fp32 (ground truth), eager bf16 (the
HF path) and fast bf16 (FlexAttention + sinks, grouped MoE+LoRA from MXFP4, chunked CE). A LoRA gradient passes when
fast vs eager bf16 <= 1e-2 (issue 7's bound) or, where bf16 rounding alone exceeds that (on random weights eager
bf16 is 3-15% off fp32), when fast is at least as close to fp32 as eager bf16 (25% slack). Also checks the hot-path
MXFP4 decode bit for bit and that packed documents don't attend across. Exit status 0 only if every check passes.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import SHAPES, build_random_model, make_mxfp4_resident  # noqa: E402

from gptoss_train.kernels import enable_fast_training  # noqa: E402


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach().float(), grads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--tolerance", type=float, default=1e-2)
    args = parser.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    SHAPES["check"] = dict(SHAPES["20b"], num_hidden_layers=args.layers)
    device = "cuda"
    model, stored = build_random_model("check", experts="dense", device=device, dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                        init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT's default init of B is large for a 24-layer-deep signal: keep deltas modest
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    ids = torch.randint(0, 201088, (args.batch, args.seq), device=device, generator=torch.Generator(device).manual_seed(3))

    reference32 = copy.deepcopy(model).float()
    loss32, grads32 = run(reference32, ids)
    del reference32
    torch.cuda.empty_cache()
    loss16, grads16 = run(model, ids)
    make_mxfp4_resident(model, stored, device)
    print(enable_fast_training(model), flush=True)
    loss_fast, grads_fast = run(model, ids)

    failures = []
    # The hot-path MXFP4 decode (Triton on CUDA) against the table decode, over every byte value and a scale range.
    from gptoss_train.kernels.moe import _decode_mxfp4_eager, decode_mxfp4_experts
    blocks = torch.arange(256, dtype=torch.uint8, device=device).repeat(64).view(2, 32, 16, 16)
    scales = torch.randint(100, 150, (2, 32, 16), dtype=torch.uint8, device=device)
    decode_equal = torch.equal(decode_mxfp4_experts(blocks, scales), _decode_mxfp4_eager(blocks, scales, torch.bfloat16))
    print(f"MXFP4 hot-path decode equals the table decode: {decode_equal}")
    if not decode_equal:
        failures.append("decode")
    print(f"loss: fp32 {loss32.item():.6f}  eager bf16 {loss16.item():.6f}  fast bf16 {loss_fast.item():.6f}")
    if rel(loss_fast, loss16) > args.tolerance:
        failures.append("loss")
    print(f"{'LoRA parameter':<78} {'fast/eager16':>12} {'fast/fp32':>10} {'eager16/fp32':>12}")
    worst, closer = 0.0, 0
    for name, grad in grads_fast.items():
        vs16, vs32, ref_vs32 = rel(grad, grads16[name]), rel(grad, grads32[name]), rel(grads16[name], grads32[name])
        worst = max(worst, vs16)
        closer += vs32 <= ref_vs32
        print(f"{name[-78:]:<78} {vs16:>12.2e} {vs32:>10.2e} {ref_vs32:>12.2e}")
        # bf16 noise: on random weights eager bf16 itself is 2-15% off fp32, so "fast vs eager bf16 <= 1e-2" cannot
        # separate a bug from rounding. Pass when fast is within 1e-2 of eager bf16, or at least as close to the
        # fp32 ground truth as eager bf16 is (25% slack).
        close = vs16 <= args.tolerance or vs32 <= max(args.tolerance, 1.25 * ref_vs32)
        if not close or not torch.isfinite(grad).all() or grad.abs().sum() == 0:
            failures.append(name)

    # Packed documents: two examples in one row (positions restart) vs each alone, through the flex block mask.
    with torch.no_grad():
        split = args.seq * 5 // 8
        first, second = ids[0:1, :split], ids[1:2, : args.seq - split]
        positions = torch.cat([torch.arange(split), torch.arange(args.seq - split)]).to(device)[None]
        base = model.get_base_model()
        packed = base.model(input_ids=torch.cat([first, second], 1), position_ids=positions).last_hidden_state
        alone = torch.cat([base.model(input_ids=first).last_hidden_state,
                           base.model(input_ids=second).last_hidden_state], 1)
        packed_err = rel(packed, alone)
    print(f"packed vs separate hidden states: rel err {packed_err:.2e}")
    if packed_err > args.tolerance:
        failures.append("packing")
    print(f"worst LoRA gradient rel err fast vs eager bf16: {worst:.2e} (tolerance {args.tolerance:g}); "
          f"fast closer to fp32 than eager bf16 for {closer}/{len(grads_fast)} tensors")
    print("GPU CHECK", "PASSED" if not failures else f"FAILED: {failures[:10]}")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
