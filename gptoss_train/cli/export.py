"""``gptoss-export``: turn a tuned gpt-oss into something vLLM, transformers, llama.cpp or Ollama serves.

Examples (runnable on the tiny model from ``gptoss-build-tiny``)::

    gptoss-export --base runs/tiny-base --adapter runs/lora/adapter --format mxfp4 --out exports/tiny-mxfp4
    gptoss-export --base openai/gpt-oss-20b --model runs/full-ft --format bf16 --out exports/ft-bf16
    gptoss-export --base runs/tiny-base --adapter runs/lora/adapter --format ollama --out exports/tiny-ollama
    gptoss-export validate exports/tiny-mxfp4
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)

EXAMPLES = """Examples:

* `gptoss-export --base runs/tiny-base --format mxfp4 --out exports/tiny-mxfp4`
* `gptoss-export --base openai/gpt-oss-20b --adapter runs/lora/adapter --format ollama --out exports/ft-ollama`
* `gptoss-export --base openai/gpt-oss-20b --model runs/full-ft --format bf16 --out exports/ft-bf16`
* `gptoss-export validate exports/tiny-mxfp4` (check a folder against vLLM's loader)

See docs/export.md."""


class Format(str, Enum):
    mxfp4 = "mxfp4"
    bf16 = "bf16"
    gguf = "gguf"
    ollama = "ollama"


class Rule(str, Enum):
    best = "best"
    ocp = "ocp"
    noclip = "noclip"


class GGUFDtype(str, Enum):
    mxfp4 = "mxfp4"
    bf16 = "bf16"
    f32 = "f32"


def export_command(
    base: str = typer.Option(..., "--base", help="Base checkpoint: a local HF folder or a hub id (openai/gpt-oss-20b)."),
    out: Path = typer.Option(..., "--out", help="Output folder (or a .gguf file for --format gguf)."),
    format: Format = typer.Option(Format.mxfp4, "--format", help=(
        "mxfp4: HF folder with MXFP4 experts + quantization_config (vLLM, transformers). "
        "bf16: HF folder with dense experts, no quantization_config (vLLM, no quantization loss). "
        "gguf: llama.cpp file, experts MXFP4 (ggml type 39). "
        "ollama: GGUF + Modelfile with the Harmony template.")),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter folder trained on --base."),
    model: Optional[Path] = typer.Option(None, "--model", help="Merged or fully fine-tuned HF folder (instead of --adapter)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    rule: Rule = typer.Option(Rule.best, "--rule", help=(
        "MXFP4 scale rule for changed blocks: best (smaller error of the two, default), ocp (floor, llama.cpp), "
        "noclip (ceil, transformers/triton). Original scales are kept where the new values fit.")),
    gguf_dtype: GGUFDtype = typer.Option(GGUFDtype.mxfp4, "--gguf-dtype", help=(
        "Experts in the GGUF: mxfp4 (default, same bytes as the mxfp4 export), or bf16/f32 for debugging.")),
    device: Optional[str] = typer.Option(None, "--device", help="Where to merge and requantize (cpu, cuda)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Print the per-tensor requantization table."),
) -> None:
    """Export BASE (+ --adapter or --model) to --format at --out. Runs the vLLM layout validator on HF folders."""
    from gptoss_train.export import ExportError, export_model
    from gptoss_train.model.checkpoint import CheckpointError

    def show(requant_report):
        if report:
            console.print(requant_report.rich_table())
            summary = requant_report.summary()
            console.print(f"experts changed: {summary['experts_changed']}/{summary['experts']}, "
                          f"blocks changed: {summary['blocks_changed_fraction']:.2%}")

    try:
        path = export_model(
            base, adapter=adapter, model=model, out_dir=out, format=format.value, force=force,
            rule=rule.value, gguf_dtype=gguf_dtype.value, device=device, on_report=show,
        )
    except (ExportError, CheckpointError, FileNotFoundError, ValueError, KeyError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from error
    console.print(f"[green]wrote[/green] {path}")


def validate_command(
    folder: Path = typer.Argument(..., help="A HF gpt-oss folder (config.json + *.safetensors)."),
) -> None:
    """Check FOLDER against vLLM's gpt-oss loader: names, shapes, dtypes, config/tensor agreement, shards."""
    from gptoss_train.export import validate_vllm_layout

    problems = validate_vllm_layout(folder)
    if problems:
        for problem in problems:
            console.print(f"[red]✗[/red] {problem}")
        raise typer.Exit(code=1)
    console.print(f"[green]✓[/green] {folder}: layout OK for vLLM / transformers")


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``gptoss-export validate FOLDER`` or ``gptoss-export --base ... --format ... --out ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Two commands, but the export one is the default and needs no sub-command name: dispatch on the first word.
    if args and args[0] == "validate":
        app = typer.Typer(add_completion=False)
        app.command()(validate_command)
        app(args[1:], prog_name="gptoss-export validate")
    else:
        app = typer.Typer(add_completion=False, rich_markup_mode="markdown")
        app.command(epilog=EXAMPLES)(export_command)
        app(args, prog_name="gptoss-export")


if __name__ == "__main__":
    main()
