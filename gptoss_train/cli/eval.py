"""``gptoss-eval``: did the fine-tune help? Reasoning and tool-use suites against a local model, a server or a GGUF.

Examples:

\b
  gptoss-eval list
  gptoss-eval --suite gsm8k --model oracle --data bundled --out runs/check
  gptoss-eval --suite demo --model runs/tiny-base --out runs/demo-base
  gptoss-eval --suite demo --model runs/tiny-base --adapter runs/lora --out runs/demo-tuned
  gptoss-eval compare runs/demo-base runs/demo-tuned
  gptoss-eval --suite gpqa-diamond --model http://localhost:8000/v1 --effort low,medium,high
  gptoss-eval --suite aime25 --model exports/model.gguf --effort high --max-tokens 65536
  gptoss-eval --config configs/eval/reasoning-sweep.yaml --model openai/gpt-oss-20b

\b
--model: oracle (gold answers: checks the harness itself),
         http(s)://... (OpenAI-compatible server: vLLM, Ollama, llama.cpp server),
         FILE.gguf (llama.cpp in process), else a local folder or hub id (transformers).
Interrupted runs resume from --out: run the same command again. Docs: docs/eval.md.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


class Api(str, Enum):
    auto = "auto"
    completions = "completions"
    chat = "chat"


class Experts(str, Enum):
    bf16 = "bf16"
    mxfp4 = "mxfp4"


def _parse_extra(pairs: list[str]) -> dict:
    extra = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise typer.BadParameter(f"--option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            extra[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.strip().replace("-", "_")] = value
    return extra


def run_command(
    suite: Optional[str] = typer.Option(None, "--suite", help="Suite name (see `gptoss-eval list`)."),
    model: Optional[str] = typer.Option(None, "--model", help="oracle | http(s)://server/v1 | FILE.gguf | folder/hub id."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter folder for a local --model."),
    effort: Optional[str] = typer.Option(None, "--effort", help="Reasoning effort(s): low, medium, high or a sweep "
                                         "'low,medium,high' (default medium)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N samples."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder: results.json, samples.jsonl, report.html, "
                                       "cache.jsonl (resume)."),
    data: Optional[str] = typer.Option(None, "--data", help="Local data file in the dataset's schema (.jsonl/.csv/"
                                       ".parquet), or 'bundled' for the few test items in evals/<suite>/. "
                                       "Default: the real set from the hub/URL."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Completion budget per turn (default: the "
                                             "suite's recommendation for the effort)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 = greedy (default 1.0; demo: 0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling (default 1.0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed and GPQA option shuffle seed (default 0)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Local backend batch size (CPU 4, GPU 64)."),
    experts: Optional[Experts] = typer.Option(None, "--experts", help="Local model experts: bf16 or mxfp4-resident."),
    device: Optional[str] = typer.Option(None, "--device", help="Local model device (cpu, cuda)."),
    api: Optional[Api] = typer.Option(None, "--api", help="Server API: completions (our Harmony prompt, default), "
                                      "chat (server's template; reasoning_effort passed) or auto."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Server key (default: $OPENAI_API_KEY)."),
    served_model: Optional[str] = typer.Option(None, "--served-model", help="Model name on the server (default: "
                                               "the first of /v1/models)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Parallel server requests (default 8)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds per server request (default 600)."),
    retries: Optional[int] = typer.Option(None, "--retries", help="Retries on timeouts / 429 / 5xx (default 4)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Judge model spec for suites with NL assertions "
                                        "(tau-bench)."),
    user_model: Optional[str] = typer.Option(None, "--user-model", help="User simulator spec (tau-bench; default: "
                                             "the --model backend; 'scripted' for CI)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Trials per task for pass^k (tau-bench)."),
    option: list[str] = typer.Option([], "--option", help="Extra suite option KEY=VALUE (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with any of these options (flags override)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Reuse cached samples in --out (default) or start "
                                "over."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Run a suite against a model; print the scores; write results to --out."""
    import logging

    import yaml

    from gptoss_train.eval import run_suite

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings: dict = {}
    if config is not None:
        if not config.is_file():
            console.print(f"[red]error:[/red] --config {config} does not exist")
            raise typer.Exit(2)
        settings = {k.replace("-", "_"): v for k, v in (yaml.safe_load(config.read_text()) or {}).items()}
    flags = dict(suite=suite, model=model, adapter=adapter, effort=effort, limit=limit, out=out, data=data,
                 max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                 experts=experts.value if experts else None, device=device, api=api.value if api else None,
                 api_key=api_key, served_model=served_model, concurrency=concurrency, timeout=timeout,
                 retries=retries, judge=judge, user_model=user_model, trials=trials)
    settings.update({k: v for k, v in flags.items() if v is not None})
    settings.update(_parse_extra(option))
    if isinstance(settings.get("effort"), list):
        settings["effort"] = ",".join(settings["effort"])
    if not settings.get("suite") or not settings.get("model"):
        console.print("[red]error:[/red] --suite and --model are required (see `gptoss-eval --help`, "
                      "`gptoss-eval list`)")
        raise typer.Exit(2)
    backend_keys = {"experts": "experts", "device": "device", "api": "api", "api_key": "api_key",
                    "served_model": "served_model", "concurrency": "concurrency", "timeout": "timeout",
                    "retries": "max_retries"}
    backend_options = {target: settings.pop(key) for key, target in backend_keys.items() if key in settings}
    backend_options.setdefault("api_key", os.environ.get("OPENAI_API_KEY"))
    name, spec = settings.pop("suite"), settings.pop("model")
    out_dir = settings.pop("out", None)
    try:
        results = run_suite(name, model=spec, out_dir=out_dir, progress=progress, resume=resume,
                            backend_options=backend_options, **settings)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished samples are cached; run the same command to resume")
        raise typer.Exit(130)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError, ImportError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error
    _print_summary(results)
    if out_dir is not None:
        console.print(f"[green]wrote[/green] {out_dir}/results.json, samples.jsonl, report.html")


def _print_summary(results: dict) -> None:
    table = Table(title=f"{results['suite']} — {results['model'].get('model', results['model'].get('backend'))}")
    for column in ("effort", "n", "score", "95% interval", "failures"):
        table.add_column(column)
    for effort, metrics in results["metrics"].items():
        low, high = metrics["score_ci"]["ci95"]
        failures = ", ".join(f"{k} {v}" for k, v in metrics.get("failures", {}).items()) or "-"
        table.add_row(effort, str(metrics["n"]), f"{metrics['score']:.3f}", f"[{low:.3f}, {high:.3f}]", failures)
    Console().print(table)
    for warning in results.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {warning}")


def list_command() -> None:
    """List the suites and where their data comes from."""
    from gptoss_train.eval.core import get_suite, suite_names

    table = Table(title="gptoss-eval suites")
    table.add_column("suite")
    table.add_column("description")
    for name in suite_names():
        suite = get_suite(name)
        try:
            description = (getattr(suite, "definition", None) or {}).get("description", "")
        except Exception:  # a suite whose definition file is missing still gets listed
            description = ""
        if not description and suite.__doc__:
            description = suite.__doc__.strip().splitlines()[0]
        table.add_row(name, description)
    Console().print(table)


def compare_command(
    base: Path = typer.Argument(..., help="--out folder of the base model's run."),
    tuned: Path = typer.Argument(..., help="--out folder of the tuned model's run (same suite)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write compare.json and compare.html here."),
) -> None:
    """Base vs tuned on the same items: score delta (paired bootstrap 95% interval), McNemar p, flipped items."""
    from gptoss_train.eval.report import compare_runs, render_compare
    from gptoss_train.eval.results import atomic_write_text

    try:
        comparison = compare_runs(base, tuned)
    except (FileNotFoundError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from error
    table = Table(title=f"{comparison['suite']}: {base} vs {tuned}")
    for column in ("effort", "n", "base", "tuned", "delta [95%]", "McNemar p", "fixed", "broken"):
        table.add_column(column)
    for effort, c in comparison["efforts"].items():
        pb = c["paired_bootstrap"]
        table.add_row(effort, str(c["n"]), f"{c['base_score']:.3f}", f"{c['tuned_score']:.3f}",
                      f"{pb['delta']:+.3f} [{pb['ci95'][0]:+.3f}, {pb['ci95'][1]:+.3f}]", f"{c['mcnemar_p']:.3g}",
                      str(len(c["fixed"])), str(len(c["broken"])))
    Console().print(table)
    if comparison.get("note"):
        console.print(f"[yellow]note:[/yellow] {comparison['note']}")
    if out is not None:
        atomic_write_text(out / "compare.json", json.dumps(comparison, indent=2, default=str) + "\n")
        atomic_write_text(out / "compare.html", render_compare(comparison))
        console.print(f"[green]wrote[/green] {out}/compare.json, compare.html")


def report_command(run: Path = typer.Argument(..., help="--out folder of a run.")) -> None:
    """Re-render RUN/report.html from results.json and samples.jsonl."""
    from gptoss_train.eval.report import write_report
    from gptoss_train.eval.results import read_run

    results, records = read_run(run)
    console.print(f"[green]wrote[/green] {write_report(run, results, records)}")


_SUBCOMMANDS = {"list": list_command, "compare": compare_command, "report": report_command}


def main(argv: list[str] | None = None) -> None:
    """``gptoss-eval [list|compare|report] ...``; without a sub-command, run a suite."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Running a suite is the default and needs no sub-command word: dispatch on the first argument.
    if args and args[0] in _SUBCOMMANDS:
        app = typer.Typer(add_completion=False)
        app.command()(_SUBCOMMANDS[args[0]])
        app(args[1:], prog_name=f"gptoss-eval {args[0]}")
    else:
        app = typer.Typer(add_completion=False, help=__doc__)
        app.command(help=__doc__ + "\nSub-commands: list, compare BASE TUNED, report RUN.")(run_command)
        app(args, prog_name="gptoss-eval")


if __name__ == "__main__":
    main()
