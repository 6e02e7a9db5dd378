"""Correctness of FastGenerator on a gpt-oss-20b-shaped model: same greedy tokens as transformers' generate().

    source scripts/device_setup.sh
    python scripts/gpu_check_generate.py --out $OUT/gen-check

Random bf16 weights built on the GPU; two prompts of different lengths (one past the 128-token sliding window) go
through FastGenerator in one batch, with and without CUDA graphs, and each through transformers' generate()
(`--ref-experts`: "batched_mm" by default, the fast exact-per-token experts path of transformers; "eager" is its
per-expert loop, ~2 tokens/s at this size). Reported per prompt: the length of the common prefix of the greedy
tokens (64 = all), and where they differ, the reference's own top-1/top-2 logit margin there (a tie within bf16
rounding is not a bug), plus teacher-forced agreement: our prefill logits over prompt + reference tokens against
the reference's greedy choices. Exit code 1 if the graph and eager paths disagree or agreement is poor.
`--preset tiny` runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_generate import build_random_model, random_prompts, use_stock_experts  # noqa: E402

from gptoss_train.kernels.gen_model import (  # noqa: E402
    KVCache,
    moe,
    out_projection,
    prefill,
    prefill_attention,
    qkv_rope,
    swiglu,
)
from gptoss_train.kernels.generation import FastGenerator  # noqa: E402


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _attention_fp32(w, layer, q, k, v):
    """Causal (or sliding) attention with the sink, plainly in fp32: the yardstick for the SDPA formulation."""
    t = q.shape[0]
    groups = w.num_heads // w.num_kv_heads
    qf = q.float().transpose(0, 1)
    kf = k.float().transpose(0, 1).repeat_interleave(groups, 0)
    vf = v.float().transpose(0, 1).repeat_interleave(groups, 0)
    scores = qf @ kf.transpose(1, 2) * w.scaling
    i = torch.arange(t, device=q.device)
    allowed = i[None, :] <= i[:, None]
    if layer.sliding:
        allowed &= i[None, :] > i[:, None] - w.window
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = layer.sinks.float()[:, None, None].expand(-1, t, 1)
    probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    return (probs @ vf).transpose(0, 1).reshape(t, -1)


def _moe_fp32_loop(w, layer, h):
    """Routed experts one (token, expert) pair at a time in fp32: the yardstick for the grouped GEMMs."""
    logits = torch.nn.functional.linear(h, layer.router_w, layer.router_b)
    top_v, top_i = torch.topk(logits, w.top_k, dim=-1)
    scores = torch.softmax(top_v.float(), dim=1)
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for t in range(h.shape[0]):
        for j in range(w.top_k):
            e = int(top_i[t, j])
            gu = h[t].float() @ layer.gate_up[e].float() + layer.gate_up_b[e].float()
            y = swiglu(gu, w.swiglu_alpha, w.swiglu_limit) @ layer.down[e].float() + layer.down_b[e].float()
            out[t] += scores[t, j] * y
    return out


def layer_diagnostics(model, weights, prompt, use_grouped) -> list[dict]:
    """Per layer, on transformers' own inputs to that layer's attention and MLP: our output vs transformers' output,
    and our bf16 pieces vs plain fp32 formulas. Localises a mismatch to one component instead of 24 layers."""
    captured: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def attn_hook(module, args, kwargs, out, i=i):
            captured[i, "attn_in"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[i, "attn_out"] = out[0] if isinstance(out, tuple) else out

        def mlp_hook(module, args, out, i=i):
            captured[i, "mlp_in"] = args[0]
            captured[i, "mlp_out"] = out[0] if isinstance(out, tuple) else out

        hooks.append(layer.self_attn.register_forward_hook(attn_hook, with_kwargs=True))
        hooks.append(layer.mlp.register_forward_hook(mlp_hook))
    with torch.no_grad():
        model(torch.tensor([prompt], device=model.device))
    for h in hooks:
        h.remove()
    t = len(prompt)
    pos = torch.arange(t, device=model.device)
    rows = []
    with torch.no_grad():
        for i, layer in enumerate(weights.layers):
            a_in = captured[i, "attn_in"].reshape(t, -1)
            q, k, v = qkv_rope(weights, layer, a_in, weights.cos2[pos], weights.sin2[pos])
            core = prefill_attention(weights, layer, q, k, v, [(0, t)], 1024).reshape(t, -1)
            attn = out_projection(layer, core)
            m_in = captured[i, "mlp_in"].reshape(t, -1)
            mine = moe(weights, layer, m_in, use_grouped)
            row = dict(
                layer=i, sliding=layer.sliding,
                attn_vs_transformers=_rel(attn, captured[i, "attn_out"].reshape(t, -1)),
                sdpa_vs_fp32=_rel(core, _attention_fp32(weights, layer, q, k, v)),
                moe_vs_transformers=_rel(mine, captured[i, "mlp_out"].reshape(t, -1)),
            )
            if i in (0, len(weights.layers) - 1):
                loop = _moe_fp32_loop(weights, layer, m_in[:8])
                row["moe_vs_fp32_loop"] = _rel(mine[:8], loop)
                row["transformers_moe_vs_fp32_loop"] = _rel(captured[i, "mlp_out"].reshape(t, -1)[:8], loop)
            rows.append(row)
            print(json.dumps(row))
    return rows


def conditioning_probe(preset, device, dtype, length, ref_experts) -> dict:
    """How well-posed greedy agreement is on the standard-init random model, measured on transformers alone.

    One random sequence; transformers' logits from one full forward vs from two chunks (the second half reading the
    first half's KV cache): the same model and library in a different bf16 operation order. Our prefill is compared
    with the full forward too. Top-1 agreement over the second half's positions."""
    from transformers import DynamicCache

    model = build_random_model(preset, device, dtype, seed=1)
    use_stock_experts(model, ref_experts)
    seq = random_prompts(1, length, seed=7)[0]
    ids = torch.tensor([seq], device=device)
    half = length // 2
    with torch.no_grad():
        full = model(ids).logits[0, half:].float()
        cache = DynamicCache(config=model.config)
        model(ids[:, :half], past_key_values=cache, use_cache=True)
        chunked = model(ids[:, half:], past_key_values=cache, use_cache=True).logits[0].float()
        gen = FastGenerator(model, max_batch=1, max_seq_len=length + 8, use_cuda_graphs=False)
        cache_ours = KVCache(gen.weights, 1, length + 8)
        ours = prefill(gen.weights, cache_ours, [seq], [0], gen.use_grouped, all_logits=True)[half:]
    agree = lambda a, b: float((a.argmax(-1) == b.argmax(-1)).float().mean())  # noqa: E731
    result = dict(
        length=length,
        transformers_full_vs_chunked_top1=agree(full, chunked),
        transformers_full_vs_chunked_max_abs=float((full - chunked).abs().max()),
        ours_vs_transformers_full_top1=agree(ours, full),
        ours_vs_transformers_full_max_abs=float((ours - full).abs().max()),
        logit_std=float(full.std()),
    )
    print(json.dumps(dict(conditioning=result)))
    del model, gen, cache_ours
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="20b")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-lens", default="40,300")
    ap.add_argument("--ref-experts", default="batched_mm", choices=["batched_mm", "eager", "grouped_mm"])
    ap.add_argument("--embed-std", type=float, default=None, help="rescale token embeddings (well-conditioned model)")
    ap.add_argument("--conditioning-len", type=int, default=200,
                    help="also measure, on the standard-init model, how far transformers agrees with itself")
    ap.add_argument("--out", default="gen-check")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [int(x) for x in args.prompt_lens.split(",")]
    conditioning = None
    if args.conditioning_len:
        conditioning = conditioning_probe(args.preset, device, dtype, args.conditioning_len, args.ref_experts)
    model = build_random_model(args.preset, device, dtype, seed=1, embed_std=args.embed_std)
    prompts = [random_prompts(1, n, seed=n)[0] for n in lens]
    max_len = max(lens) + args.new + 8

    use_stock_experts(model, args.ref_experts)
    probe = FastGenerator(model, max_batch=1, max_seq_len=max_len, use_cuda_graphs=False)
    diagnostics = layer_diagnostics(model, probe.weights, prompts[0], probe.use_grouped)
    del probe

    graphs = FastGenerator(model, max_batch=4, max_seq_len=max_len, use_cuda_graphs=True)
    ours = graphs.generate(prompts, max_new_tokens=args.new, temperature=0, stop_ids=())
    del graphs
    eager = FastGenerator(model, max_batch=4, max_seq_len=max_len, use_cuda_graphs=False)
    ours_eager = eager.generate(prompts, max_new_tokens=args.new, temperature=0, stop_ids=())

    report = []
    ok = ours == ours_eager
    for prompt, mine in zip(prompts, ours):
        with torch.no_grad():
            ref_out = model.generate(
                torch.tensor([prompt], device=device), max_new_tokens=args.new, min_new_tokens=args.new,
                do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0, eos_token_id=None,
            )
        ref = ref_out.sequences[0, len(prompt):].tolist()
        common = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), len(ref))
        row = dict(prompt_len=len(prompt), new=args.new, common_prefix=common, ours=mine, reference=ref)
        if common < len(ref):
            top2 = ref_out.scores[common][0].float().topk(2).values
            row["ref_top2_margin_at_divergence"] = float(top2[0] - top2[1])
        # Teacher forcing: our prefill over prompt + reference tokens, argmax at each generated position.
        with torch.no_grad():
            cache = KVCache(eager.weights, 1, len(prompt) + len(ref))
            logits = prefill(eager.weights, cache, [prompt + ref[:-1]], [0], eager.use_grouped, all_logits=True)
        ours_tf = logits[len(prompt) - 1 :].argmax(-1).tolist()
        ref_scores = torch.stack([s[0].float() for s in ref_out.scores])
        row["teacher_forced_top1_agreement"] = sum(a == b for a, b in zip(ours_tf, ref)) / len(ref)
        row["teacher_forced_max_abs_logit_diff"] = float((logits[len(prompt) - 1 :] - ref_scores).abs().max())
        row["ref_logit_std"] = float(ref_scores.std())
        ok &= row["teacher_forced_top1_agreement"] >= 0.9
        report.append(row)
        summary = {k: v for k, v in row.items() if k not in ("ours", "reference")}
        print(json.dumps(summary))
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                  ref_experts=args.ref_experts, embed_std=args.embed_std, graph_equals_eager=ours == ours_eager,
                  prompts=report, layers=diagnostics, conditioning=conditioning)
    (out_dir / "check.json").write_text(json.dumps(result, indent=1))
    print(f"graph path == eager path: {ours == ours_eager}")
    for row in report:
        print(f"prompt {row['prompt_len']}: greedy common prefix {row['common_prefix']}/{row['new']}, "
              f"teacher-forced top-1 agreement {row['teacher_forced_top1_agreement']:.3f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
