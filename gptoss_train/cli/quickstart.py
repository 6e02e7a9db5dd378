"""``gptoss-quickstart``: the whole loop on a CPU in minutes, on a random tiny gpt-oss and the bundled demo data.

1. build a tiny random checkpoint in the real gpt-oss layout (MXFP4 experts, Harmony vocabulary);
2. measure held-out tool-call exact match (``demo`` eval suite) before tuning;
3. LoRA fine-tune on the demo train split with ``recipes/sft_lora.py`` and ``configs/sft/tiny-cpu-lora.yaml``
   (the same recipe and config users run);
4. print the loss curve (text; CSV + SVG in the output folder) and save the adapter (PEFT format);
5. measure again and print the before/after table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "sft_lora.py"
CONFIG = REPO / "configs" / "sft" / "tiny-cpu-lora.yaml"


def _load_recipe():
    if not RECIPE.exists():
        raise SystemExit(f"error: {RECIPE} not found; run gptoss-quickstart from a gptoss-train checkout")
    spec = importlib.util.spec_from_file_location("gptoss_recipe_sft_lora", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate_demo(base: str, out_dir: Path, *, adapter: str | None, limit: int | None, max_tokens: int) -> dict:
    """Held-out demo metrics through the eval package's ``demo`` suite (greedy)."""
    from gptoss_train.eval import run_suite

    results = run_suite("demo", model=base, adapter=adapter, out_dir=out_dir, limit=limit, max_tokens=max_tokens,
                        batch_size=16, resume=False, progress=True, report=False)
    metrics = next(iter(results["metrics"].values()))
    return {"n": metrics["n"], "tool_call_accuracy": metrics["tool_call_accuracy"],
            "final_accuracy": metrics.get("final_accuracy"), "score": metrics["score"],
            "failures": metrics.get("failures", {})}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def print_summary(before: dict, after: dict, curve, timings: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from gptoss_train.train.callbacks import sparkline, text_plot

    console = Console()
    console.print("\n[bold]Training loss[/bold]")
    console.print(text_plot(curve))
    console.print(f"sparkline: {sparkline([v for _, v in curve])}")
    table = Table(title=f"Held-out demo conversations (n={after['n']}, greedy)")
    table.add_column("metric")
    table.add_column("before tuning", justify="right")
    table.add_column("after LoRA", justify="right")
    table.add_row("tool call exact match (name + JSON-equal arguments)", _pct(before["tool_call_accuracy"]),
                  _pct(after["tool_call_accuracy"]))
    table.add_row("final answer exact match (after a correct call)", _pct(before["final_accuracy"]),
                  _pct(after["final_accuracy"]))
    table.add_row("both right", _pct(before["score"]), _pct(after["score"]))
    console.print(table)
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    console.print(f"adapter: {out / 'train' / 'final'}\nloss curve: {out / 'train' / 'loss.csv'} "
                  f"(and loss.svg)\nsummary: {out / 'summary.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gptoss-quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test conversations")
    parser.add_argument("--max-tokens", type=int, default=64, help="generation budget per assistant turn")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for the recipe, e.g. train.lr=3e-3")
    args = parser.parse_args(argv)

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from gptoss_train.harmony.encoding import ensure_vocab_env
    from gptoss_train.train.callbacks import read_loss_csv
    from gptoss_train.train.config import load_config
    from gptoss_train.train.model_setup import ensure_base_checkpoint

    ensure_vocab_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    base = out / "base"
    overrides = [f"model.path={base}", f"train.output_dir={out / 'train'}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(CONFIG, overrides)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    print(f"[1/4] building a tiny random gpt-oss checkpoint at {base}", flush=True)
    ensure_base_checkpoint(cfg.model, seed=cfg.train.seed)
    timings["build"] = time.perf_counter() - started

    started = time.perf_counter()
    print("[2/4] held-out tool-call exact match before tuning", flush=True)
    before = evaluate_demo(str(base), out / "eval-before", adapter=None, limit=args.eval_limit,
                           max_tokens=args.max_tokens)
    timings["eval before"] = time.perf_counter() - started

    started = time.perf_counter()
    print(f"[3/4] LoRA fine-tuning: {RECIPE.relative_to(REPO)} --config {CONFIG.relative_to(REPO)}", flush=True)
    recipe = _load_recipe()
    code = recipe.main(["--config", str(CONFIG), *overrides])
    if code:
        return code
    timings["train"] = time.perf_counter() - started

    started = time.perf_counter()
    print("[4/4] held-out tool-call exact match after tuning", flush=True)
    adapter = out / "train" / "final"
    after = evaluate_demo(str(base), out / "eval-after", adapter=str(adapter), limit=args.eval_limit,
                          max_tokens=args.max_tokens)
    timings["eval after"] = time.perf_counter() - started

    curve = read_loss_csv(out / "train" / "loss.csv")
    summary = {"before": before, "after": after, "seconds": timings, "steps": len(curve),
               "loss_first": curve[0][1] if curve else None, "loss_last": curve[-1][1] if curve else None,
               "threads": torch.get_num_threads(), "adapter": str(adapter)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(before, after, curve, timings, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
