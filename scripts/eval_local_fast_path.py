"""GPU check of gptoss-eval's local backend: it picks the fast CUDA generation path, and the fast path's greedy
completions match transformers generate on the same prompts; prints both timings.

    source scripts/device_setup.sh; python scripts/eval_local_fast_path.py --preset tiny --n 16 --max-tokens 64

On CPU it runs too (both sides are transformers generate there), which is how it is tested.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: build a random one with --preset)")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "20b"))
    parser.add_argument("--n", type=int, default=16, help="number of demo prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from gptoss_train.eval.backends.local import LocalBackend
    from gptoss_train.eval.core import get_suite
    from gptoss_train.eval.suites.base import make_request

    path = args.model
    if path is None:
        from gptoss_train.model.tiny import build_checkpoint

        path = str(build_checkpoint(tempfile.mkdtemp(prefix="gptoss-eval-check-"), preset=args.preset, seed=0))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fast = LocalBackend(path, device=device, batch_size=args.n)
    suite = get_suite("demo")
    samples = list(suite.samples())[: args.n]
    options = {"reasoning_effort": "low", "max_tokens": args.max_tokens, "temperature": 0.0}
    requests = [make_request(suite, s, list(s.data["prompt"]), options, tools=s.data["tools"]) for s in samples]

    timings = {}
    for label, path_name in (("selected", fast.generation_path), ("hf", "hf")):
        fast.generation_path = path_name
        fast.generate_batch(requests[:1])  # warm-up (graph capture, allocator)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        results = fast.generate_batch(requests)
        if device == "cuda":
            torch.cuda.synchronize()
        timings[label] = (path_name, time.perf_counter() - started, results)
    (selected_name, selected_s, selected), (_, hf_s, reference) = timings["selected"], timings["hf"]
    same = sum(a.tokens == b.tokens for a, b in zip(selected, reference))
    first_token_same = sum(a.tokens[:1] == b.tokens[:1] for a, b in zip(selected, reference))
    tokens = sum(len(r.tokens) for r in selected)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "selected_path": selected_name, "n": len(requests),
        "identical_completions": same, "identical_first_token": first_token_same,
        "selected_seconds": round(selected_s, 3), "hf_seconds": round(hf_s, 3),
        "selected_tokens_per_s": round(tokens / selected_s, 1),
        "hf_tokens_per_s": round(sum(len(r.tokens) for r in reference) / hf_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
