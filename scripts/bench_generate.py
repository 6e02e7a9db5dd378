"""Generation throughput: transformers' generate() vs gptoss_train's FastGenerator, same model and prompts, one process.

Run on the GPU machine (docs/benchmarks.md, "Generation throughput"):

    source scripts/device_setup.sh
    python scripts/bench_generate.py --out $OUT/gen-bench

The model is gpt-oss-20b-shaped with random bf16 weights built in GPU memory (no download). Stock transformers runs
with its per-expert loop (`experts_implementation="eager"`; its grouped_mm default gathers a [tokens*top_k, 2880,
5760] weight copy and runs out of memory) and only a few tokens, since it is slow. For each (batch, prompt length):
decode tokens/s (tokens produced by decode steps / decode time, graph captures excluded), time to first token (the
first sequence's; and the whole batch's prefill), and peak GPU memory (weights included). Greedy decoding, no stop
tokens, so every sequence runs to max_new_tokens. `--preset tiny` runs the same code on CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gptoss_train.kernels.generation import FastGenerator  # noqa: E402

PRESETS = {
    # gpt-oss-20b: 24 layers alternating sliding (128) / full attention, 32 experts top-4, hidden 2880.
    "20b": dict(num_hidden_layers=24, num_local_experts=32),
    "tiny": dict(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, hidden_size=64, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
    ),
}


def build_random_model(
    preset: str, device: str, dtype: torch.dtype, seed: int = 0, embed_std: float | None = None,
    router_scale: float | None = None, tied_head: float | None = None,
):
    """A randomly initialised GptOssForCausalLM of the preset's shape, built directly on `device` in `dtype`.

    embed_std rescales the token embeddings. With transformers' init (std 0.02) every layer adds O(1) outputs to a
    0.02-sized token signal, so logits hinge on bf16 rounding of large common terms (see gpu_check_generate.py);
    a larger embedding keeps the token identity dominant.
    router_scale multiplies the router weights: routing then rests mostly on the (random) router bias, so bf16 noise
    in the hidden state rarely flips an expert choice (a flip swaps a quarter of a layer's MLP output).
    tied_head adds tied_head * 0.02 * embedding[perm[v]] to lm_head row v (perm a fixed random permutation): the model
    then favours the token v with perm[v] == current token by a clear margin (a confident model) instead of the flat
    logits of an untrained one. Rough size with embed_std 1 on the 20b shape: the 48 attention/MLP outputs leave the
    residual stream at rms ~5, so that token's logit is ~0.02 * tied_head * 2880 / 5 ~ 11 * tied_head, against a
    maximum of ~5.5 over the random part of 201k logits (gpu_check_generate.py reports the measured margins)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=201088, **PRESETS[preset])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    with torch.no_grad():  # non-zero biases, sinks and router (init leaves biases at zero)
        for name, param in model.named_parameters():
            if name.endswith(("_bias", "sinks")) or "router" in name:
                param.normal_(0, 0.5 if "sinks" in name else 0.05)
        if embed_std is not None:
            model.model.embed_tokens.weight.normal_(0, embed_std)
        if router_scale is not None:
            for layer in model.model.layers:
                layer.mlp.router.weight.mul_(router_scale)
        if tied_head is not None:
            if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr():
                raise ValueError("tied_head needs untied embeddings")
            g = torch.Generator(device="cpu").manual_seed(seed + 1)
            perm = torch.randperm(config.vocab_size, generator=g).to(device)
            embed = model.model.embed_tokens.weight
            for start in range(0, config.vocab_size, 16384):  # chunks: no second full-size temporary
                rows = slice(start, min(start + 16384, config.vocab_size))
                model.lm_head.weight[rows] += (tied_head * 0.02) * embed[perm[rows]]
    return model


def make_experts_mxfp4(model, seed: int = 0) -> None:
    """Replace every layer's bf16 experts by random MXFP4 bytes held resident (kernels.moe.attach_mxfp4_experts):
    random E2M1 codes with scale bytes 116-119 (weights of magnitude ~2^-11..2^-6, as in bench_train.py)."""
    from gptoss_train.kernels.moe import attach_mxfp4_experts

    g = torch.Generator(device=model.device).manual_seed(seed)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        packed = []
        for name in ("gate_up_proj", "down_proj"):
            e, k, n = getattr(experts, name).shape  # [E, in, out] -> HF layout [E, out, in/32, 16]
            packed.append(torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8, device=model.device,
                                        generator=g))
            packed.append(torch.randint(116, 120, (e, n, k // 32), dtype=torch.uint8, device=model.device,
                                        generator=g))
        attach_mxfp4_experts(experts, *packed)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def use_stock_experts(model, implementation: str) -> str:
    """Select transformers' experts implementation (API moved between 5.x releases)."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        try:
            setter(implementation)
            return implementation
        except Exception as err:  # noqa: BLE001 - report and fall back to the config attribute
            print(f"set_experts_implementation({implementation!r}) failed: {err}")
    model.config._experts_implementation = implementation
    return implementation


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ordinary text ids (below the Harmony specials at 199998+).
    return torch.randint(0, 199_000, (batch, length), generator=g).tolist()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def bench_ours(gen: FastGenerator, batch: int, prompt_len: int, new_tokens: int) -> dict:
    prompts = random_prompts(batch, prompt_len, seed=batch * 100_000 + prompt_len)
    _reset_peak()
    _sync()
    t0 = time.perf_counter()
    out = gen.generate(prompts, max_new_tokens=new_tokens, temperature=0, stop_ids=())
    _sync()
    total = time.perf_counter() - t0
    st = gen.stats
    assert all(len(o) == new_tokens for o in out), "a sequence stopped early"
    decode_s = st.decode_s - st.capture_s
    return dict(
        impl="ours", batch=batch, prompt=prompt_len, new_tokens=new_tokens,
        decode_tok_s=st.decode_tokens / decode_s if decode_s > 0 else None,
        step_ms=1000 * decode_s / max(st.decode_steps, 1),
        ttft_s=st.first_token_s, prefill_batch_s=st.prefill_s, capture_s=st.capture_s,
        graphs=st.graphs_captured, total_s=total, peak_gib=_peak_gib(),
    )


def bench_stock(model, batch: int, prompt_len: int, new_tokens: int) -> dict:
    prompts = torch.tensor(random_prompts(batch, prompt_len, seed=batch * 100_000 + prompt_len), device=model.device)
    mask = torch.ones_like(prompts)
    row = dict(impl="transformers", batch=batch, prompt=prompt_len, new_tokens=new_tokens)

    def run(n: int) -> float:
        _sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0, eos_token_id=None,
            )
        _sync()
        return time.perf_counter() - t0

    try:
        _reset_peak()
        t1 = run(1)
        tn = run(new_tokens)
        row.update(
            decode_tok_s=batch * (new_tokens - 1) / (tn - t1) if tn > t1 else None,
            step_ms=1000 * (tn - t1) / (new_tokens - 1), ttft_s=t1, prefill_batch_s=t1, total_s=tn,
            peak_gib=_peak_gib(),
        )
    except torch.OutOfMemoryError as err:
        row.update(error=f"OOM: {str(err).splitlines()[0][:120]}")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def graph_step_ms(gen: FastGenerator, batch: int, kv_len: int, iters: int = 50) -> float | None:
    """Pure GPU time of one decode step (graph replay, no sampling or host work), by CUDA events."""
    if not gen.use_cuda_graphs:
        return None
    gen._positions[:batch] = torch.arange(batch, device=gen.device) % 64 + kv_len // 2
    gen._tokens[:batch] = 1
    gen._run_decode(batch, kv_len)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        gen._run_decode(batch, kv_len)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def profile_step(gen: FastGenerator, batch: int, kv_len: int, out_dir: Path) -> dict:
    """Kernel-level profile of one eager decode step: count and time per kernel name (top 20 written)."""
    from torch.profiler import ProfilerActivity, profile

    gen._positions[:batch] = kv_len // 2
    gen._tokens[:batch] = 1
    step_fn = gen._step_fn(batch)  # the step the graphs capture (fused Triton kernels or eager)
    step = lambda: step_fn(  # noqa: E731
        gen.weights, gen.cache, gen._tokens[:batch], gen._positions[:batch], kv_len, gen.use_grouped
    )
    step()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "cuda_time_total", 0)
        if dev_us and ev.key and not ev.key.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            rows.append((ev.key, ev.count, dev_us))
    rows.sort(key=lambda r: -r[2])
    kernels = sum(r[1] for r in rows)
    total_us = sum(r[2] for r in rows)
    text = [f"batch {batch}, kv_len {kv_len}: {kernels} kernels, {total_us / 1000:.3f} ms kernel time "
            f"({step_fn.__name__}, run outside a graph)"]
    text += [f"{us / 1000:9.3f} ms {count:6d}x  {name[:110]}" for name, count, us in rows[:20]]
    (out_dir / f"profile_{step_fn.__name__}_b{batch}.txt").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return dict(batch=batch, kv_len=kv_len, kernels=kernels, kernel_ms=total_us / 1000, step=step_fn.__name__)


def expert_gemm_microbench(gen: FastGenerator, batches=(1, 4, 16, 64)) -> list[dict]:
    """One layer's two expert products at decode sizes: torch's grouped GEMM vs gen_kernels.expert_gemm (a few
    tile configurations), median of CUDA-event timings (triton.testing.do_bench), with the bytes of the experts
    touched over time as an effective bandwidth. Picks EXPERT_GEMM_MAX_PAIRS / tiles from data, not guesses."""
    import triton.testing

    from gptoss_train.kernels import gen_kernels as K
    from gptoss_train.kernels.gen_model import expert_mm, route

    w = gen.weights
    layer = w.layers[0]
    saved = (K.EXPERT_GEMM_TILES, K.MXFP4_GEMM_TILES)
    rows = []
    g = torch.Generator(device=gen.device).manual_seed(0)
    from gptoss_train.kernels.moe import decode_mxfp4_experts

    def random_mxfp4(weight):  # [E, in, out] bf16 -> blocks [E, out, in/32, 16], scales, decoded [E, in, out]
        e, k, n = weight.shape
        blocks = torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8, device=gen.device, generator=g)
        scales = torch.randint(116, 120, (e, n, k // 32), dtype=torch.uint8, device=gen.device, generator=g)
        return blocks, scales, decode_mxfp4_experts(blocks, scales, w.dtype).transpose(-1, -2)

    mxfp4_layer = (random_mxfp4(layer.gate_up), random_mxfp4(layer.down))
    for batch in batches:
        logits = torch.randn(batch, w.num_experts, device=gen.device, generator=g).to(w.dtype)
        _, _, expert_sorted, _, offs = route(logits, w.top_k, w.num_experts)
        pairs = batch * w.top_k
        xs = torch.randn(pairs, layer.gate_up.shape[1], device=gen.device, generator=g).to(w.dtype)
        act = torch.randn(pairs, layer.down.shape[1], device=gen.device, generator=g).to(w.dtype)
        touched = int((torch.bincount(expert_sorted, minlength=w.num_experts) > 0).sum())
        nbytes = touched * (layer.gate_up[0].numel() + layer.down[0].numel()) * layer.gate_up.element_size()
        grouped = lambda: (expert_mm(xs, layer.gate_up, offs, expert_sorted, True),  # noqa: E731
                           expert_mm(act, layer.down, offs, expert_sorted, True))
        ref = grouped()
        ms = triton.testing.do_bench(grouped, warmup=25, rep=200, return_mode="median")
        row = dict(batch=batch, pairs=pairs, experts_touched=touched, mb=nbytes / 1e6, grouped_mm_us=ms * 1e3,
                   grouped_mm_tb_s=nbytes / ms / 1e9)
        best = None
        for bn, bk, st in ((64, 128, 4), (32, 128, 4), (64, 256, 3), (128, 64, 4), (32, 256, 3), (64, 64, 6)):
            K.EXPERT_GEMM_TILES = (bn, bk, st)
            fn = lambda: (K.expert_gemm(xs, layer.gate_up, offs), K.expert_gemm(act, layer.down, offs))  # noqa: E731
            try:
                got = fn()
                err = max(_rel(got[0], ref[0]), _rel(got[1], ref[1]))
                t = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            except Exception as exc:  # noqa: BLE001 - one bad tile config must not lose the others
                row[f"triton_{bn}_{bk}_{st}"] = f"{type(exc).__name__}: {str(exc)[:100]}"
                continue
            row[f"triton_{bn}_{bk}_{st}"] = dict(us=t * 1e3, tb_s=nbytes / t / 1e9, rel_err=err)
            if err < 1e-2 and (best is None or t < best[0]):
                best = (t, bn, bk, st)
        row["best_triton"] = None if best is None else dict(us=best[0] * 1e3, tiles=best[1:])
        # The same products from MXFP4 bytes (random codes, scale bytes 116-119 as in bench_train.py): the weights
        # are decoded in registers, 0.53 bytes a weight read instead of 2.
        mx_gu, mx_dn = mxfp4_layer
        mx_ref = (expert_mm(xs, mx_gu[2], offs, expert_sorted, True),
                  expert_mm(act, mx_dn[2], offs, expert_sorted, True))
        mx_bytes = nbytes * (0.5 + 1 / 32) / 2
        for bn, bk, st in ((64, 64, 3), (64, 128, 3), (32, 128, 3), (128, 64, 3), (64, 64, 5), (32, 64, 4)):
            K.MXFP4_GEMM_TILES = (bn, bk, st)
            fn = lambda: (K.expert_gemm_mxfp4(xs, *mx_gu[:2], offs),  # noqa: E731
                          K.expert_gemm_mxfp4(act, *mx_dn[:2], offs))
            try:
                got = fn()
                err = max(_rel(got[0], mx_ref[0]), _rel(got[1], mx_ref[1]))
                t = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            except Exception as exc:  # noqa: BLE001
                row[f"mxfp4_{bn}_{bk}_{st}"] = f"{type(exc).__name__}: {str(exc)[:100]}"
                continue
            row[f"mxfp4_{bn}_{bk}_{st}"] = dict(us=t * 1e3, tb_s=mx_bytes / t / 1e9, rel_err=err)
        rows.append(row)
        print(json.dumps(row))
    K.EXPERT_GEMM_TILES, K.MXFP4_GEMM_TILES = saved
    del mxfp4_layer
    torch.cuda.empty_cache()
    return rows


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def weight_bytes_per_step(model, batch: int, mxfp4: bool = False) -> float:
    """Fewest bytes one decode step must read: attention + router + lm_head + the experts the batch can touch
    (2 bytes a weight in bf16; MXFP4: half a byte plus one scale byte per 32)."""
    cfg = model.config
    h, e, k = cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok
    expert = (h * 2 * cfg.intermediate_size + cfg.intermediate_size * h) * (0.5 + 1 / 32 if mxfp4 else 2)
    attn = (h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim * 2) * 2
    touched = min(e, batch * k)
    per_layer = attn + touched * expert + h * e * 2
    return cfg.num_hidden_layers * per_layer + cfg.vocab_size * h * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="20b", choices=sorted(PRESETS))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompts", default="512,4096", help="prompt lengths")
    ap.add_argument("--new", type=int, default=128, help="new tokens per sequence (ours)")
    ap.add_argument("--stock-new", type=int, default=5, help="new tokens per sequence (transformers; slow)")
    ap.add_argument("--no-stock", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--gemm-bench", action="store_true", help="time expert_gemm vs grouped_mm at decode sizes first")
    ap.add_argument("--expert-gemm-max-pairs", type=int, default=None,
                    help="override gen_kernels.EXPERT_GEMM_MAX_PAIRS (Triton expert GEMM up to this many pairs)")
    ap.add_argument("--variants", default="default",
                    help="comma list of our variants to time: default (the shipped settings), eager (unfused step), "
                         "tgemm (fused step with the Triton expert GEMM up to batch 64), grouped (fused step, "
                         "torch grouped GEMM only)")
    ap.add_argument("--mxfp4", action="store_true",
                    help="experts as resident MXFP4 bytes (random codes); ours reads them directly. No stock rows "
                         "(transformers would need them decoded to bf16)")
    ap.add_argument("--out", default="bench-generate")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(p) for p in args.prompts.split(",")]

    import transformers

    env = dict(
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        grouped_mm=hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"),
        triton=_triton_version(),
        command=" ".join(sys.argv),
    )
    print(json.dumps(env))
    t0 = time.perf_counter()
    model = build_random_model(args.preset, device, dtype)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"model built in {time.perf_counter() - t0:.1f}s; {params:.2f}B params")
    if args.mxfp4:
        make_experts_mxfp4(model)
        args.no_stock = True
        env["experts"] = "mxfp4"
    rows = []

    max_len = max(lengths) + args.new + 8
    gen = FastGenerator(model, max_batch=max(batches), max_seq_len=max_len, keep_mxfp4=args.mxfp4)
    print(f"grouped GEMM experts: {gen.use_grouped}; CUDA graphs: {gen.use_cuda_graphs}; "
          f"fused kernels: {gen.fused_kernels}")
    extra = {}
    if args.gemm_bench and device == "cuda":
        try:
            extra["expert_gemm_microbench"] = expert_gemm_microbench(gen)
        except Exception as err:  # noqa: BLE001 - a microbenchmark failure must not lose the benchmark rows
            print(f"expert GEMM microbenchmark failed: {type(err).__name__}: {err}")
            extra["expert_gemm_microbench"] = f"{type(err).__name__}: {str(err)[:300]}"
    if args.expert_gemm_max_pairs is not None:
        from gptoss_train.kernels import gen_kernels

        gen_kernels.EXPERT_GEMM_MAX_PAIRS = args.expert_gemm_max_pairs
    gen.generate(random_prompts(2, 16, 0), max_new_tokens=4, temperature=0, stop_ids=())  # warm-up
    from gptoss_train.kernels import gen_kernels

    shipped_pairs = gen_kernels.EXPERT_GEMM_MAX_PAIRS
    settings = {"default": ("ours", True, shipped_pairs), "eager": ("ours (eager step)", False, 0),
                "tgemm": ("ours (fused, Triton expert GEMM)", True, gen_kernels.MAX_FUSED_PAIRS),
                "grouped": ("ours (fused, grouped_mm experts)", True, 0)}
    variants = [settings[v] for v in args.variants.split(",")]
    extra["expert_gemm_max_pairs_default"] = shipped_pairs
    for name, fused, pairs in variants:
        gen.fused_kernels = fused and device == "cuda"
        gen_kernels.EXPERT_GEMM_MAX_PAIRS = pairs
        gen.reset_graphs()
        for prompt_len in lengths:
            for batch in batches:
                row = bench_ours(gen, batch, prompt_len, args.new)
                row["impl"] = name
                row["fused_in_use"] = gen.fused_kernels
                row["expert_gemm_max_pairs"] = gen_kernels.EXPERT_GEMM_MAX_PAIRS
                row["floor_ms"] = weight_bytes_per_step(model, batch, args.mxfp4) / 3.0e12 * 1000  # ~3 TB/s read
                rows.append(row)
                print(json.dumps(row))
        if gen.fused_error:
            extra[f"fused_error_{name}"] = gen.fused_error
        for batch in batches:
            ms = graph_step_ms(gen, batch, 1024 if max_len >= 1024 else gen._length_buckets[0])
            extra[f"graph_step_ms_b{batch}_kv1024_{name}"] = ms
            print(f"{name}: graph replay only, batch {batch}, kv 1024: {ms} ms")
        if not args.no_profile:
            for batch in (min(batches), max(batches)):
                kv_len = 1024 if max_len >= 1024 else gen._length_buckets[0]
                extra[f"profile_b{batch}_{name}"] = profile_step(gen, batch, kv_len, out_dir)
    gen.fused_kernels = device == "cuda"
    gen_kernels.EXPERT_GEMM_MAX_PAIRS = shipped_pairs
    gen.reset_graphs()
    del gen
    if device == "cuda":
        torch.cuda.empty_cache()

    if not args.no_stock:
        use_stock_experts(model, "eager")
        for prompt_len in lengths:
            for batch in batches:
                row = bench_stock(model, batch, prompt_len, args.stock_new)
                rows.append(row)
                print(json.dumps(row))

    (out_dir / "results.json").write_text(json.dumps(dict(env=env, rows=rows, extra=extra), indent=1))
    lines = [
        "| impl | batch | prompt | decode tok/s | step ms | floor ms | TTFT s | batch prefill s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['batch']} | {r['prompt']} | {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['impl']} | {r['batch']} | {r['prompt']} | {fmt(r['decode_tok_s'], ',.1f')} | {fmt(r['step_ms'], '.2f')} "
            f"| {fmt(r.get('floor_ms'), '.2f')} | {fmt(r['ttft_s'], '.3f')} | {fmt(r['prefill_batch_s'], '.2f')} "
            f"| {fmt(r['peak_gib'], '.1f')} |"
        )
    table = "\n".join(lines)
    (out_dir / "table.md").write_text(table + "\n")
    print(json.dumps(extra))
    print(table)


if __name__ == "__main__":
    main()
