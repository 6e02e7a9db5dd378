#!/usr/bin/env python3
"""Training-throughput benchmark: the Hugging Face LoRA path and ours, side by side, in one process, on one GPU.

    source scripts/device_setup.sh
    python scripts/bench_train.py --out /tmp/bench                  # everything (about 6 minutes on an H100)
    python scripts/bench_train.py --phases hf,fast --steps 3        # just the head-to-head

Same random gpt-oss-20b-shaped model and the same batches for both paths (4 x 2048 tokens, LoRA r=8):
  hf       transformers eager attention + grouped_mm experts, PEFT LoRA on attention + experts of layers 7/15/23
           (the HF recipe), dense bf16 experts decoded from the MXFP4 bytes, gradient checkpointing.
  fast     gptoss_train.kernels.enable_fast_training on the same model, experts now MXFP4-resident (the dense copy
           is freed), recompute=layer, decoder layers compiled (the default on CUDA); a torch.profiler table of it.
  fast_eager   the same with the decoder layers left eager (the pieces alone: A/B for the compiled layers).
  recompute    the other recompute choices (layer_checkpoint: transformers' checkpointing around the compiled
               layers instead of our recompute); all_experts: LoRA on every expert.
  pieces       recompute=layer with other MXFP4 decode-piece budgets (--piece-sweep).
  opt_in       the opt-in options on top of fast, cumulatively: LoRA products in bf16, layer inputs in host memory,
               then host-memory embeddings.
  long     largest sequence (16K/32K/64K, batch 1) that trains, all-expert LoRA.
  120b     120b-shaped model, MXFP4 experts resident, LoRA on attention + all experts: does a step fit on the card?
Reported per row: tokens/s, useful-FLOP utilisation (4 x active params per token, against a bf16 matmul measured in
this run), peak allocated memory, and the peak up to the loss (forward + CE) of one extra step. Weights are random:
throughput and memory do not depend on their values.
A JSON line per measurement goes to --out/results.jsonl; a torch.profiler table of one fast step to profile_fast.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptoss_train.kernels import enable_fast_training, install_recompute  # noqa: E402
from gptoss_train.kernels.moe import _unwrap_experts, attach_mxfp4_experts, decode_mxfp4_experts  # noqa: E402

SHAPES = {
    # gpt-oss-20b / -120b (config.json of the released checkpoints); "tiny" is a CPU smoke-test shape.
    "20b": dict(num_hidden_layers=24, num_local_experts=32, hidden_size=2880, intermediate_size=2880,
                num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088),
    "120b": dict(num_hidden_layers=36, num_local_experts=128, hidden_size=2880, intermediate_size=2880,
                 num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088),
    "tiny": dict(num_hidden_layers=4, num_local_experts=4, hidden_size=128, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=4096),
}
HF_RECIPE_EXPERT_LAYERS = (7, 15, 23)


def gpt_oss_config(shape: str):
    from transformers import GptOssConfig

    dims = SHAPES[shape]
    layers = dims["num_hidden_layers"]
    return GptOssConfig(**dims, num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
                        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                        attention_dropout=0.0, tie_word_embeddings=False, use_cache=False)


def random_mxfp4(num_experts: int, rows: int, cols: int, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 matrices [E, rows, cols] in HF layout; scale bytes 116-119 give |w| <= 0.023 (like std-0.02 init)."""
    blocks = torch.randint(0, 256, (num_experts, rows, cols // 32, 16), dtype=torch.uint8, device=device,
                           generator=generator)
    scales = torch.randint(116, 120, (num_experts, rows, cols // 32), dtype=torch.uint8, device=device,
                           generator=generator)
    return blocks, scales


def build_random_model(shape: str, *, experts: str, device: str, dtype=torch.bfloat16, seed: int = 0):
    """A GptOssForCausalLM of ``shape`` with random weights; experts ``"dense"`` (decoded from random MXFP4 bytes,
    which are returned on the CPU so the same weights can be attached later) or ``"mxfp4"`` (resident bytes only).

    Built on the meta device and materialised piece by piece, so a 120b shape never allocates dense experts."""
    from transformers import GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    config = gpt_oss_config(shape)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = GptOssForCausalLM(config).to(dtype)
    for layer in model.model.layers:  # drop the dense expert stacks before materialising anything
        layer.mlp.experts.gate_up_proj = torch.nn.Parameter(torch.empty(1, device="meta", dtype=dtype))
        layer.mlp.experts.down_proj = torch.nn.Parameter(torch.empty(1, device="meta", dtype=dtype))
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("_bias") or name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
    with torch.device(device):
        model.model.rotary_emb = GptOssRotaryEmbedding(config=config)
    mxfp4_bytes = []
    hidden, inter, num_experts = config.hidden_size, config.intermediate_size, config.num_local_experts
    for layer in model.model.layers:
        gate_up = random_mxfp4(num_experts, 2 * inter, hidden, device, generator)
        down = random_mxfp4(num_experts, hidden, inter, device, generator)
        module = layer.mlp.experts
        if experts == "mxfp4":
            attach_mxfp4_experts(module, *gate_up, *down)
        else:  # dense [E, in, out] = transposed decode of the same bytes
            module.gate_up_proj = torch.nn.Parameter(decode_mxfp4_experts(*gate_up, dtype).transpose(1, 2).contiguous())
            module.down_proj = torch.nn.Parameter(decode_mxfp4_experts(*down, dtype).transpose(1, 2).contiguous())
            mxfp4_bytes.append(tuple(t.cpu() for t in (*gate_up, *down)))
    return model, mxfp4_bytes


def make_mxfp4_resident(model, mxfp4_bytes, device) -> None:
    """Swap every layer's dense experts for the MXFP4 bytes they were decoded from (frees the dense stacks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer, stored in zip(base.model.layers, mxfp4_bytes):
        experts, _ = _unwrap_experts(layer.mlp.experts)
        attach_mxfp4_experts(experts, *(t.to(device) for t in stored))
    gc.collect()
    torch.cuda.empty_cache()


def lora_config(*, expert_layers, rank: int = 8):
    """The HF recipe's LoRA (all-linear = attention projections) plus experts of ``expert_layers`` (None: all)."""
    from peft import LoraConfig

    if expert_layers is None:
        targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    else:
        targets = [f"{i}.mlp.experts.{name}" for i in expert_layers for name in ("gate_up_proj", "down_proj")]
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                      target_parameters=targets)


def active_params_per_token(config) -> int:
    h, d = config.hidden_size, config.head_dim
    attention = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    experts = config.num_experts_per_tok * 3 * h * config.intermediate_size
    router = h * config.num_local_experts
    return config.num_hidden_layers * (attention + experts + router) + config.vocab_size * h


def matmul_tflops(device, size: int = 8192, reps: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def train_steps(model, batch, *, steps: int, warmup: int, profile_to: Path | None = None):
    """(seconds per step, peak GiB, last loss, peak GiB up to the loss) for `steps` steps after `warmup` ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    cuda = batch.is_cuda
    loss = None

    def step():
        nonlocal loss
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.detach()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    forward_peak = float("nan")
    if cuda:  # where the peak sits: up to the loss (forward + CE) or in backward
        torch.cuda.reset_peak_memory_stats()
        out = model(input_ids=batch, labels=batch)
        forward_peak = torch.cuda.max_memory_allocated() / 2**30
        out.loss.backward()
        optimizer.zero_grad(set_to_none=True)
        del out
    if profile_to is not None and cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            step()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        profile_to.write_text(kernel_summary(averages) + "\n\n" + kernels_by_full_name(averages) + "\n\n"
                              + averages.table(sort_by="self_cuda_time_total", row_limit=70) + "\n\n"
                              + averages.table(sort_by="self_cpu_time_total", row_limit=30))
        # the timeline, for GPU idle time and what the CPU was doing meanwhile (scripts/trace_gaps.py)
        prof.export_chrome_trace(str(profile_to.with_suffix(".trace.json")))
    del optimizer
    return seconds, peak, float(loss), forward_peak


KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("grouped GEMM (torch's cutlass grouped_mm)", ("at4cuda6detail",)),
    ("MXFP4 decode", ("_decode_kernel",)),
    ("flex attention", ("flex_attention",)),
    ("dense GEMM, fp32 (sgemm / f32 xmma)", ("sgemm", "f32f32")),
    ("dense GEMM, bf16 (cuBLAS)", ("nvjet", "xmma", "gemm", "cutlass")),
    ("inductor fused (triton_)", ("triton_",)),
    ("copies / memset", ("memcpy", "Memcpy", "memset", "Memset", "copy_kernel")),
)


def kernel_summary(averages) -> str:
    """Self GPU time of one profiled step by kind of kernel (the table below it has the kernels themselves)."""
    totals: dict[str, float] = {}
    for event in averages:
        if "cuda" not in str(getattr(event, "device_type", "")).lower():
            continue
        micros = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        kind = next((kind for kind, keys in KERNEL_KINDS if any(k in event.key for k in keys)), "other kernels")
        totals[kind] = totals.get(kind, 0.0) + micros / 1e3
    lines = [f"{'GPU time by kind of kernel (one step)':<44} {'ms':>8}"]
    lines += [f"{kind:<44} {ms:>8.1f}" for kind, ms in sorted(totals.items(), key=lambda kv: -kv[1])]
    lines.append(f"{'total':<44} {sum(totals.values()):>8.1f}")
    return "\n".join(lines)


def kernels_by_full_name(averages, limit: int = 40, width: int = 240) -> str:
    """The GPU kernels of one profiled step with their names whole (the profiler's table cuts them at 55
    characters, which hides inductor's fused ops and CUTLASS's tile shapes)."""
    rows = []
    for event in averages:
        if "cuda" not in str(getattr(event, "device_type", "")).lower():
            continue
        micros = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        rows.append((micros / 1e3, event.count, event.key))
    rows.sort(key=lambda row: -row[0])
    lines = [f"{'ms':>8} {'calls':>6} {'us/call':>8}  kernel (whole name, first {width} characters)"]
    lines += [f"{ms:>8.2f} {count:>6} {ms * 1e3 / max(count, 1):>8.1f}  {name[:width]}{_template_ints(name)}"
              for ms, count, name in rows[:limit]]
    return "\n".join(lines)


def _template_ints(name: str) -> str:
    # Mangled CUTLASS kernels carry their tile and cluster shapes as integer template arguments (cute::C<128>: "ILi128EE").
    ints = re.findall(r"ILi(\d+)EE", name) if name.startswith("_Z") else []
    return f"  [integer template args: {','.join(ints[:12])}]" if ints else ""


class Report:
    def __init__(self, out_dir: Path, flops_per_token: float, matmul_rate: float):
        self.out_dir, self.flops_per_token, self.matmul_rate = out_dir, flops_per_token, matmul_rate
        self.rows: list[dict] = []

    def add(self, flops_per_token: float | None = None, **row):
        if "seconds" in row and "tokens" in row:
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
            row["useful_tflops"] = row["tokens_per_s"] * (flops_per_token or self.flops_per_token) / 1e12
            row["utilisation"] = row["useful_tflops"] / self.matmul_rate if self.matmul_rate else float("nan")
        self.rows.append(row)
        with open(self.out_dir / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print("RESULT", json.dumps(row), flush=True)

    def table(self) -> str:
        lines = [f"{'run':<52} {'tok/s':>8} {'util':>6} {'peak GiB':>9} {'fwd GiB':>8} {'loss':>7} {'wall s':>7}"]
        for r in self.rows:
            if "tokens_per_s" in r:
                lines.append(f"{r['run']:<52} {r['tokens_per_s']:>8.0f} {r['utilisation']:>6.1%} "
                             f"{r['peak_gib']:>9.2f} {r.get('forward_peak_gib', float('nan')):>8.2f} "
                             f"{r.get('loss', float('nan')):>7.3f} {r.get('wall_s', float('nan')):>7.1f}")
            else:
                lines.append(f"{r['run']:<44} {r.get('status', '')}")
        return "\n".join(lines)


def _free(*objects):
    for obj in objects:
        del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _try_step(report: Report, run: str, model, batch, flops_per_token: float | None = None, **kwargs):
    try:
        start = time.perf_counter()
        seconds, peak, loss, forward_peak = train_steps(model, batch, **kwargs)
        from gptoss_train.kernels import compile_failure
        report.add(run=run, tokens=batch.numel(), seconds=seconds, peak_gib=peak, loss=loss,
                   forward_peak_gib=forward_peak, wall_s=time.perf_counter() - start,
                   compile_failure=compile_failure(), flops_per_token=flops_per_token)
        return True
    except torch.OutOfMemoryError as err:
        report.add(run=run, status=f"out of memory ({str(err).splitlines()[0][:120]})")
        return False
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="20b", choices=["20b", "tiny"], help="model shape of the head-to-head")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens there)")
    parser.add_argument("--phases", default="hf,fast,fast_eager,recompute,all_experts,long,120b",
                        help="comma list of: hf, fast, fast_eager, recompute, pieces, opt_in, all_experts, long, "
                             "120b")
    parser.add_argument("--recompute-choices", default="layer_checkpoint,experts,attention,none",
                        help="what the recompute phase measures besides layer")
    parser.add_argument("--offload-embeddings", action="store_true",
                        help="ours: frozen input embedding table in pinned host memory (kernels/embedding.py)")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="tokens per chunk of the linear + CE")
    parser.add_argument("--offload-layer-inputs", action="store_true",
                        help="ours: the layer inputs our recompute saves in pinned host memory (kernels/layer.py)")
    parser.add_argument("--lora-bf16", action="store_true",
                        help="ours: PEFT's linear LoRA products in bf16 instead of fp32 (kernels/lora.py)")
    parser.add_argument("--decode-piece-mib", type=int, default=None,
                        help="largest transient bf16 piece of a decoded MXFP4 expert stack (default: the kernels')")
    parser.add_argument("--forward-piece-mib", type=int, default=None,
                        help="the same for products run with autograd off (a recomputed layer's forward)")
    parser.add_argument("--piece-sweep", default="512:1024,256:256",
                        help="pieces phase: comma list of BACKWARD:FORWARD piece budgets in MiB")
    parser.add_argument("--long-seqs", default="16384,32768,65536")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    args = parser.parse_args(argv)
    phases = set(args.phases.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from peft import get_peft_model
    import peft
    import transformers

    print(f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} torch={torch.__version__} "
          f"transformers={transformers.__version__} peft={peft.__version__}", flush=True)
    config = gpt_oss_config(args.shape)
    rate = matmul_tflops(device) if device == "cuda" else float("nan")
    report = Report(args.out, 4 * active_params_per_token(config), rate)
    report.add(run="bf16 matmul 8192^3", status=f"{rate:.0f} TFLOP/s", tflops=rate,
               active_params=active_params_per_token(config))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device,
                          generator=torch.Generator(device=device).manual_seed(1))
    recipe_layers = [i for i in HF_RECIPE_EXPERT_LAYERS if i < config.num_hidden_layers] or [0]

    model = stored = None
    if phases & {"hf", "fast", "fast_eager", "recompute", "pieces", "opt_in", "all_experts", "long"}:
        model, stored = build_random_model(args.shape, experts="dense", device=device, dtype=dtype)
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, lora_config(expert_layers=recipe_layers))
    if "hf" in phases:
        base = model.get_base_model()
        if hasattr(base, "set_experts_implementation"):
            with contextlib.suppress(Exception):
                base.set_experts_implementation("grouped_mm")
        experts_impl = getattr(base.config, "_experts_implementation", None)
        _try_step(report, f"HF eager + {experts_impl} experts, LoRA L7/15/23", model, batch,
                  steps=args.steps, warmup=args.warmup)

    from gptoss_train.kernels import moe
    if args.decode_piece_mib is not None:
        moe.DECODE_PIECE_BYTES = args.decode_piece_mib * 2**20
    if args.forward_piece_mib is not None:
        moe.NO_GRAD_DECODE_PIECE_BYTES = args.forward_piece_mib * 2**20
    if phases & {"fast", "fast_eager", "recompute", "pieces", "opt_in", "all_experts", "long"}:
        make_mxfp4_resident(model, stored, device)
        description = enable_fast_training(model, recompute="layer", loss_chunk_size=args.loss_chunk,
                                           offload_embeddings=args.offload_embeddings, force=device != "cuda",
                                           lora_matmul_dtype=torch.bfloat16 if args.lora_bf16 else None,
                                           offload_layer_inputs=args.offload_layer_inputs)
        print(description, flush=True)
        if "fast" in phases:
            options = (", LoRA products bf16" if args.lora_bf16 else "") + (
                ", layer inputs in host memory" if args.offload_layer_inputs else "") + (
                ", embeddings in host memory" if args.offload_embeddings else "")
            _try_step(report, f"ours MXFP4, LoRA L7/15/23, recompute=layer{options}", model, batch,
                      steps=args.steps, warmup=args.warmup, profile_to=args.out / "profile_fast.txt")
        if "fast_eager" in phases:
            from gptoss_train.kernels.layer import install_compiled_layers, remove_compiled_layers
            compiled = remove_compiled_layers(model)
            install_recompute(model, "layer")  # eager layers: transformers' checkpointing
            _try_step(report, "ours MXFP4, LoRA L7/15/23, recompute=layer, eager layers", model, batch,
                      steps=args.steps, warmup=1, profile_to=args.out / "profile_fast_eager.txt")
            if compiled:
                install_compiled_layers(model)
                install_recompute(model, "layer")
        if "recompute" in phases:
            for choice in args.recompute_choices.split(","):
                if choice == "layer_checkpoint":
                    install_recompute(model, "layer", own=False)
                    run = "recompute=layer by transformers' checkpointing"
                else:
                    install_recompute(model, choice)
                    run = f"recompute={choice}"
                _try_step(report, f"ours MXFP4, LoRA L7/15/23, {run}", model, batch, steps=args.steps, warmup=1)
            install_recompute(model, "layer")
        if "pieces" in phases:
            defaults = moe.DECODE_PIECE_BYTES, moe.NO_GRAD_DECODE_PIECE_BYTES
            for budgets in args.piece_sweep.split(","):
                backward_mib, forward_mib = (int(v) for v in budgets.split(":"))
                moe.DECODE_PIECE_BYTES, moe.NO_GRAD_DECODE_PIECE_BYTES = backward_mib * 2**20, forward_mib * 2**20
                _try_step(report, f"ours MXFP4, LoRA L7/15/23, recompute=layer, pieces {backward_mib}/{forward_mib} "
                          "MiB (bwd/fwd)", model, batch, steps=args.steps, warmup=1)
            moe.DECODE_PIECE_BYTES, moe.NO_GRAD_DECODE_PIECE_BYTES = defaults
        if "opt_in" in phases:  # cumulative: bf16 LoRA products, layer inputs in host memory, embeddings there too
            from gptoss_train.kernels import (install_layer_inputs_in_host, install_lora_matmul_dtype,
                                              offload_frozen_embeddings)
            run = "ours MXFP4, LoRA L7/15/23, recompute=layer"
            if not args.lora_bf16:
                install_lora_matmul_dtype(model, torch.bfloat16)
                run += ", LoRA products bf16"
                _try_step(report, run, model, batch, steps=args.steps, warmup=1)
            if not args.offload_layer_inputs:
                install_layer_inputs_in_host(model)
                run += ", layer inputs in host memory"
                _try_step(report, run, model, batch, steps=args.steps, warmup=1,
                          profile_to=args.out / "profile_opt_in.txt")
            if not args.offload_embeddings:
                offload_frozen_embeddings(model)
                run += ", embeddings in host memory"
                _try_step(report, run, model, batch, steps=args.steps, warmup=1)
        if phases & {"all_experts", "long"}:
            model = get_peft_model(model.unload(), lora_config(expert_layers=None))
            if "all_experts" in phases:
                _try_step(report, "ours MXFP4, LoRA attn + all experts, recompute=layer", model, batch,
                          steps=args.steps, warmup=1)
            if "long" in phases:
                for seq in (int(s) for s in args.long_seqs.split(",")):
                    long_batch = torch.randint(0, config.vocab_size, (1, seq), device=device)
                    if not _try_step(report, f"ours long context 1 x {seq}, all experts", model, long_batch,
                                     steps=1, warmup=1):
                        break
    _free(model, stored)
    model = stored = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    if "120b" in phases:
        shape = "120b" if args.shape == "20b" else "tiny"
        try:
            big, _ = build_random_model(shape, experts="mxfp4", device=device, dtype=dtype)
            resident = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")
            report.add(run=f"{shape} MXFP4-resident weights", status=f"{resident:.1f} GiB resident")
            big = get_peft_model(big, lora_config(expert_layers=None))
            print(enable_fast_training(big, recompute="layer", force=device != "cuda",
                                       lora_matmul_dtype=torch.bfloat16 if args.lora_bf16 else None,
                                       offload_layer_inputs=args.offload_layer_inputs,
                                       offload_embeddings=args.offload_embeddings), flush=True)
            for rows in (1, args.batch):
                big_batch = torch.randint(0, config.vocab_size, (rows, args.seq), device=device)
                if not _try_step(report, f"{shape} LoRA attn + all experts, {rows} x {args.seq}", big, big_batch,
                                 flops_per_token=4 * active_params_per_token(gpt_oss_config(shape)),
                                 steps=1, warmup=1):
                    break
        except torch.OutOfMemoryError as err:
            report.add(run=f"{shape} build", status=f"out of memory: {str(err).splitlines()[0][:120]}")

    print("\n" + report.table(), flush=True)
    (args.out / "table.txt").write_text(report.table() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
