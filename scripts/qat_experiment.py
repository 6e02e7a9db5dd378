#!/usr/bin/env python
"""Does QAT keep a LoRA fine-tune through MXFP4 requantization?  A small, honest CPU experiment.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/qat_experiment.py --out runs/qat_experiment

Set-up (mirrors shipping a gpt-oss fine-tune):
1. A tiny gpt-oss (transformers' GptOssForCausalLM: 2 layers, 4 experts, top-2, hidden 128) is trained from scratch
   on task A: each of 64 tokens has two possible successors, seen 60% / 40% of the time; the model must prefer the
   first.
2. Its experts are quantized to MXFP4: the "released base" (original bytes, like openai/gpt-oss-20b).
3. LoRA on the experts only (r=8) tunes it for task B: the same, except that on a quarter of the tokens the
   preference flips (the 40% successor becomes the 60% one). A preference shift between answers the model already
   knows needs only a small weight change, like most real fine-tunes. Three ways to ship the tuned model are compared:
   * bf16: merged, experts stored dense in bf16 (``gptoss-export --format bf16``);
   * requantized: merged and requantized to MXFP4 (``--format mxfp4``: untouched experts keep their bytes, changed
     blocks keep their scales);
   * QAT + requantized: the same LoRA trained with ``enable_qat`` (fake MXFP4 on base + delta, scales of the base),
     then merged and requantized the same way.
   Metrics: task-B accuracy (argmax = the new preferred successor) on the flipped tokens, task-A retention on the others (next-token argmax accuracy on
   held-out random sequences), and the requantization report (share of the LoRA delta that survived).

Everything is seeded; results vary a little across seeds (use --seeds 0 1 2 to see the spread).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from gptoss_train.quant import mxfp4
from gptoss_train.quant.qat import enable_qat
from gptoss_train.quant.requantize import RequantReport, requantize_experts

VOCAB = 64
SEQ = 32
P_PREFER = 0.6  # the preferred successor's share in the training data


def build_model(seed: int):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                          vocab_size=VOCAB, sliding_window=16, max_position_embeddings=256,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return GptOssForCausalLM(config).float()


def make_tasks(seed: int):
    """Two candidate successors per token; task A prefers the first (60/40), task B flips that on a quarter of tokens.

    A fine-tune that shifts a preference between answers the base already knows needs only a small weight change -
    the regime where requantization loses the fine-tune (DESIGN.md §1.3).
    """
    generator = torch.Generator().manual_seed(seed + 1000)
    first = torch.randperm(VOCAB, generator=generator)
    second = torch.randperm(VOCAB, generator=generator)
    second = torch.where(second == first, (second + 1) % VOCAB, second)
    remapped = torch.randperm(VOCAB, generator=generator)[: VOCAB // 4]
    task_a = (first, second)
    prefer_b, other_b = first.clone(), second.clone()
    prefer_b[remapped], other_b[remapped] = second[remapped], first[remapped]
    return task_a, (prefer_b, other_b), remapped


def batch(task, size, generator, p_prefer=P_PREFER):
    prefer, other = task
    x = torch.randint(0, VOCAB, (size, SEQ), generator=generator)
    pick = torch.rand(x.shape, generator=generator) < p_prefer
    target = torch.where(pick, prefer[x], other[x])
    # transformers shifts labels: the logits at position t are scored against labels[t + 1] = target of x_t
    labels = torch.full_like(x, -100)
    labels[:, 1:] = target[:, :-1]
    return x, labels


def train(model, task, steps, lr, seed, params=None, log_every=0, label=""):
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(1, steps + 1):
        inputs, labels = batch(task, 32, generator)
        loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and step % log_every == 0:
            print(f"  [{label}] step {step}/{steps} loss {loss.item():.4f}", flush=True)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, task, tokens_mask, seed=12345, batches=8):
    """Share of positions (current token in ``tokens_mask``) whose argmax is the task's preferred successor."""
    prefer, _ = task
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    for _ in range(batches):
        x = torch.randint(0, VOCAB, (32, SEQ), generator=generator)
        predicted = model(input_ids=x).logits[:, :-1].argmax(-1)
        current = x[:, :-1]
        keep = tokens_mask[current]
        correct += int((predicted == prefer[current])[keep].sum())
        total += int(keep.sum())
    return correct / max(total, 1)


def quantize_experts(model, base_scales=None, base_blocks=None, report=None, rule="best"):
    """Experts -> MXFP4 values. With a base: requantize against it (bytes of untouched experts kept)."""
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            for proj in ("gate_up_proj", "down_proj"):
                weight = getattr(experts, proj)
                key = f"model.layers.{index}.mlp.experts.{proj}"
                if base_blocks is None:
                    blocks, scales = mxfp4.encode(weight.transpose(-1, -2), rule=rule)
                else:
                    blocks, scales, tensor_report = requantize_experts(
                        key, base_blocks[key], base_scales[key], weight.transpose(-1, -2), rule=rule)
                    if report is not None:
                        report.tensors.append(tensor_report)
                weight.copy_(mxfp4.decode(blocks, scales, dtype=torch.float32, transpose=True))
                yield key, blocks, scales


def lora_model(base, rank):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(copy.deepcopy(base), config)


def run(seed: int, args) -> dict:
    task_a, task_b, remapped = make_tasks(seed)  # (preferred, other) successor maps
    in_b = torch.zeros(VOCAB, dtype=torch.bool)
    in_b[remapped] = True
    started = time.time()

    base = train(build_model(seed), task_a, args.steps_a, args.lr_a, seed, log_every=args.log_every, label="task A")
    dense_a = accuracy(base, task_a, torch.ones(VOCAB, dtype=torch.bool))
    blocks, scales = {}, {}
    for key, b, s in quantize_experts(base):
        blocks[key], scales[key] = b, s
    released_a = accuracy(base, task_a, torch.ones(VOCAB, dtype=torch.bool))
    released_b = accuracy(base, task_b, in_b)

    results = {"seed": seed, "task_a_dense": dense_a, "released": {"task_b": released_b, "task_a": released_a}}

    import tempfile

    from safetensors.torch import save_file

    scales_dir = tempfile.TemporaryDirectory()
    save_file({f"{k}_scales": v for k, v in scales.items()}, f"{scales_dir.name}/model.safetensors")
    modes = ["plain", "qat"] + (["sft_then_qat"] if args.qat_after_steps else [])
    trained_plain = None
    for mode in modes:
        if mode == "sft_then_qat":
            # ModelOpt's order: fine-tune in high precision first, then a short QAT phase from there
            tuned = copy.deepcopy(trained_plain)
            enable_qat(tuned, scales_from=scales_dir.name)
            train(tuned, task_b, args.qat_after_steps, args.lr_b, seed + 2, log_every=args.log_every,
                  label="task B QAT after SFT")
        else:
            tuned = lora_model(base, args.rank)
            if mode == "qat":
                enable_qat(tuned, scales_from=scales_dir.name)
            train(tuned, task_b, args.steps_b, args.lr_b, seed + 1, log_every=args.log_every, label=f"task B {mode}")
        if mode == "plain":
            trained_plain = copy.deepcopy(tuned)
        if mode == "qat":
            # sanity: what QAT trained against must be what requantization ships
            results["qat_forward_task_b"] = accuracy(tuned, task_b, in_b)
        merged = copy.deepcopy(tuned).merge_and_unload()
        from gptoss_train.quant.qat import disable_qat

        disable_qat(merged)
        if mode == "plain":
            bf16 = copy.deepcopy(merged)
            with torch.no_grad():
                for layer in bf16.model.layers:
                    for proj in ("gate_up_proj", "down_proj"):
                        weight = getattr(layer.mlp.experts, proj)
                        weight.copy_(weight.to(torch.bfloat16).float())
            results["bf16"] = {"task_b": accuracy(bf16, task_b, in_b), "task_a": accuracy(bf16, task_a, ~in_b)}
        report = RequantReport(rule="best")
        for _ in quantize_experts(merged, base_scales=scales, base_blocks=blocks, report=report):
            pass
        summary = report.summary()
        results[f"{mode}_requantized"] = {
            "task_b": accuracy(merged, task_b, in_b),
            "task_a": accuracy(merged, task_a, ~in_b),
            "delta_cosine": summary["mean_delta_cosine"],
            "delta_norm_ratio": summary["mean_delta_norm_ratio"],
            "delta_rel_norm": sum(t.delta_rel_norm for t in report.tensors) / len(report.tensors),
            "blocks_changed_fraction": summary["blocks_changed_fraction"],
        }
    scales_dir.cleanup()
    results["seconds"] = time.time() - started
    return results


def markdown(all_results: list[dict], args) -> str:
    def mean(path):
        values = []
        for result in all_results:
            value = result
            for key in path:
                value = value[key]
            values.append(value)
        return sum(values) / len(values), values

    def cell(path, fmt="{:.1%}"):
        avg, values = mean(path)
        spread = " / ".join(fmt.format(v) for v in values) if len(values) > 1 else ""
        return fmt.format(avg) + (f" ({spread})" if spread else "")

    lines = [
        f"Seeds: {', '.join(str(r['seed']) for r in all_results)}; task A {args.steps_a} steps, LoRA r={args.rank} "
        f"on experts, task B {args.steps_b} steps at lr {args.lr_b}. Mean (per seed).",
        "",
        "| model | task B accuracy (remapped tokens) | task A retention (other tokens) | Δ kept (cos) | Δ norm ratio |",
        "|---|---|---|---|---|",
        f"| released base (MXFP4, before tuning) | {cell(('released', 'task_b'))} | {cell(('released', 'task_a'))} | - | - |",
        f"| LoRA, merged, bf16 experts | {cell(('bf16', 'task_b'))} | {cell(('bf16', 'task_a'))} | - | - |",
        f"| LoRA, merged, requantized MXFP4 | {cell(('plain_requantized', 'task_b'))} | "
        f"{cell(('plain_requantized', 'task_a'))} | {cell(('plain_requantized', 'delta_cosine'), '{:.2f}')} | "
        f"{cell(('plain_requantized', 'delta_norm_ratio'), '{:.2f}')} |",
        f"| LoRA + QAT, merged, requantized MXFP4 | {cell(('qat_requantized', 'task_b'))} | "
        f"{cell(('qat_requantized', 'task_a'))} | {cell(('qat_requantized', 'delta_cosine'), '{:.2f}')} | "
        f"{cell(('qat_requantized', 'delta_norm_ratio'), '{:.2f}')} |",
    ]
    if "sft_then_qat_requantized" in all_results[0]:
        key = "sft_then_qat_requantized"
        lines.append(f"| LoRA, then QAT +{args.qat_after_steps} steps, merged, requantized MXFP4 | "
                     f"{cell((key, 'task_b'))} | {cell((key, 'task_a'))} | "
                     f"{cell((key, 'delta_cosine'), '{:.2f}')} | {cell((key, 'delta_norm_ratio'), '{:.2f}')} |")
    lines += [
        "",
        f"LoRA delta size |Δ|/|W0| (plain): {cell(('plain_requantized', 'delta_rel_norm'), '{:.4f}')}; "
        f"blocks changed by requantization: plain {cell(('plain_requantized', 'blocks_changed_fraction'))}, "
        f"QAT {cell(('qat_requantized', 'blocks_changed_fraction'))}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps-a", type=int, default=600)
    parser.add_argument("--lr-a", type=float, default=3e-3)
    parser.add_argument("--steps-b", type=int, default=150)
    parser.add_argument("--lr-b", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--qat-after-steps", type=int, default=50,
                        help="also run QAT for this many steps starting from the bf16 LoRA (0: skip)")
    parser.add_argument("--log-every", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/qat_experiment"))
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    all_results = []
    for seed in args.seeds:
        print(f"seed {seed} ...", flush=True)
        result = run(seed, args)
        print(json.dumps(result, indent=1), flush=True)
        all_results.append(result)
    table = markdown(all_results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": all_results}, indent=2) + "\n")
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
