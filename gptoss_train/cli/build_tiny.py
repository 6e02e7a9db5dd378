"""``gptoss-build-tiny``: write a randomly initialised gpt-oss checkpoint in the exact hub layout.

Examples:

\b
    gptoss-build-tiny runs/tiny                       # CPU-test size (hidden 64, 2 layers, 4 experts top-2)
    gptoss-build-tiny /tmp/fake-20b --preset 20b      # real 20b shapes (13.8 GB; streamed layer by layer)
    gptoss-build-tiny /tmp/small --layers 4 --experts 8 --top-k 4 --seed 1

The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and with ``gptoss_train.model.load``:
MXFP4 experts, sharded safetensors + index, config/generation config and tokenizer as the hub ships them.
"""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)


class Preset(str, Enum):
    tiny = "tiny"
    b20 = "20b"
    b120 = "120b"


def build_command(
    out: Path = typer.Argument(..., help="Folder to write (must be missing or empty unless --overwrite)."),
    preset: Preset = typer.Option(Preset.tiny, "--preset", help="Shape preset: tiny (CPU tests), 20b or 120b."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed and shape give the same bytes."),
    layers: Optional[int] = typer.Option(None, "--layers", help="num_hidden_layers override."),
    experts: Optional[int] = typer.Option(None, "--experts", help="num_local_experts override."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="num_experts_per_tok override."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="hidden_size override (multiple of 32)."),
    intermediate: Optional[int] = typer.Option(None, "--intermediate", help="intermediate_size (multiple of 32)."),
    heads: Optional[int] = typer.Option(None, "--heads", help="num_attention_heads override."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="num_key_value_heads override."),
    device: Optional[str] = typer.Option(None, "--device", help="Where to draw and encode (default: cuda if present)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
) -> None:
    """Write a random gpt-oss checkpoint (MXFP4 experts) in the hub layout to OUT."""
    from gptoss_train.model.tiny import build_checkpoint

    overrides = {
        key: value
        for key, value in dict(
            layers=layers, experts=experts, top_k=top_k, hidden=hidden, intermediate=intermediate,
            heads=heads, kv_heads=kv_heads,
        ).items()
        if value is not None
    }
    start = time.perf_counter()
    try:
        path = build_checkpoint(
            out, preset=preset.value, seed=seed, device=device, overwrite=overwrite, progress=True, **overrides
        )
    except (FileExistsError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    console.print(f"wrote {path} ({size / 1e9:.2f} GB of safetensors) in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, help=__doc__)
    app.command()(build_command)
    app(list(sys.argv[1:] if argv is None else argv), prog_name="gptoss-build-tiny")


if __name__ == "__main__":
    main()
