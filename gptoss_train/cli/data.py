"""``gptoss-data``: check, render, inspect and measure Harmony training data.

SOURCE is a chat JSONL file (one conversation per line), a ``.json`` list, a folder written by datasets'
``save_to_disk``, or ``hf:OWNER/NAME[:SPLIT]`` for a Hugging Face hub dataset. Rows may be OpenAI-style chat
(``messages`` with ``tool_calls``, ``tool`` results and ``thinking``/``reasoning``/``reasoning_content``), the
user/analysis/final column form, or Harmony message dicts. See docs/data.md.

Examples::

    gptoss-data validate tests/data/fixtures/chat.jsonl
    gptoss-data render tests/data/fixtures/chat.jsonl --out rendered.jsonl --policy reasoning_final
    gptoss-data render tests/data/fixtures/chat.jsonl --out packed --format datasets --pack --max-length 1024
    gptoss-data inspect tests/data/fixtures/chat.jsonl --index 1
    gptoss-data stats tests/data/fixtures/chat.jsonl --max-length 1024 --pack
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gptoss_train.data.build import OnError, Truncation, build_examples, record_to_conversation
from gptoss_train.data.readers import open_source
from gptoss_train.data.stats import compute_stats
from gptoss_train.data.validation import BuildReport, DataError, DataSourceError
from gptoss_train.harmony.render import MaskPolicy, render_for_training

app = typer.Typer(
    help=(
        "Check, render, inspect and measure gpt-oss (Harmony) training data.\n\n"
        "SOURCE: a chat .jsonl file, a .json list, a datasets folder (save_to_disk) or hf:OWNER/NAME[:SPLIT]."
    ),
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
out_console = Console()


class Effort(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"


class OutputFormat(str, Enum):
    jsonl = "jsonl"
    datasets = "datasets"


POLICY_HELP = (
    "Which assistant messages are trained: final (final answers only), reasoning_final (reasoning + final answers), "
    "all_assistant (everything the assistant writes, tool calls included)."
)
SOURCE_ARG = typer.Argument(..., help="Chat JSONL file, .json list, datasets folder, or hf:OWNER/NAME[:SPLIT].")
POLICY_OPT = typer.Option(MaskPolicy.ALL_ASSISTANT, "--policy", help=POLICY_HELP)
MAX_LENGTH_OPT = typer.Option(None, "--max-length", min=1, help="Longest example (or packed row) in tokens.")
TRUNCATION_OPT = typer.Option(Truncation.DROP, "--truncation", help=(
    "Examples longer than --max-length: drop (skip and count), truncate (keep the first tokens: the prompt stays, "
    "the end is cut) or error (stop)."))
ON_ERROR_OPT = typer.Option(OnError.ERROR, "--on-error", help=(
    "Malformed examples: error (stop at the first, naming file:line) or skip (count them per reason)."))
EFFORT_OPT = typer.Option(Effort.medium, "--reasoning-effort", help="Reasoning effort for rows that do not set one.")
SPLIT_OPT = typer.Option("train", "--split", help="Split of a datasets folder or hub dataset.")
DROP_OPT = typer.Option(None, "--drop-analysis/--keep-analysis", help=(
    "Reasoning before the first final answer: drop it (openai-harmony's training default) or keep it in the "
    "sequence. Default: dropped for --policy final, kept for the policies that train reasoning."))
WORKERS_OPT = typer.Option(1, "--workers", min=1,
                           help="Render in this many processes (same output, faster on big datasets).")


def _fail(message: str, code: int = 1) -> None:
    console.print("[bold red]error:[/]", Text(message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _build_and_pack(source, *, pack: bool, max_length, **build_options):
    """Examples and the skip report; plus packed rows of ``max_length`` when ``pack`` (else None)."""
    if pack and not max_length:
        _fail("--pack needs --max-length (the length of a packed row)")
    examples, report = _build(source, max_length=max_length, **build_options)
    if not pack:
        return examples, report, None
    from gptoss_train.data.packing import pack_examples

    return examples, report, pack_examples(examples, max_length)


def _build(source: str, *, split: str, progress: bool = True, **options):
    try:
        records = list(open_source(source, split=split))
        return build_examples(records, progress=progress, total=len(records), **options)
    except DataSourceError as exc:
        _fail(str(exc), 2)
    except DataError as exc:
        _fail(f"{exc}\n(use --on-error skip to skip and count bad examples)")


def _print_report(report: BuildReport) -> None:
    console.print(
        f"read {report.read}, kept {report.kept}, truncated {report.truncated}, skipped {report.num_skipped}",
        highlight=False)
    if report.skipped:
        table = Table("reason", "count", "first examples", title="skipped", title_justify="left")
        for reason, count in report.skipped.most_common():
            table.add_row(reason, str(count), "\n".join(report.samples.get(reason, [])))
        console.print(table)


@app.command()
def validate(
    source: str = SOURCE_ARG,
    policy: MaskPolicy = POLICY_OPT,
    max_length: Optional[int] = MAX_LENGTH_OPT,
    reasoning_effort: Effort = EFFORT_OPT,
    split: str = SPLIT_OPT,
    max_samples: int = typer.Option(5, "--max-samples", help="Errors shown per reason."),
    workers: int = WORKERS_OPT,
    drop_analysis: Optional[bool] = DROP_OPT,
):
    """Check every example and list the problems (file:line, reason). Exit code 1 if any example is invalid."""
    report = BuildReport(max_samples_per_reason=max_samples)
    _build(source, split=split, policy=policy, max_length=max_length, truncation=Truncation.DROP,
           on_error=OnError.SKIP, reasoning_effort=reasoning_effort.value, report=report, workers=workers,
           auto_drop_analysis=drop_analysis)
    _print_report(report)
    notes = {"no trained tokens", "too long"}  # valid data that a training run would skip
    invalid = sum(count for reason, count in report.skipped.items() if reason not in notes)
    if invalid:
        console.print(f"[bold red]{invalid} invalid example(s)[/] in {source}", highlight=False)
        raise typer.Exit(1)
    console.print(f"[green]OK[/]: {report.kept} valid example(s) in {source}", highlight=False)


def _atomic_write_jsonl(rows, out: Path, force: bool) -> None:
    if out.exists() and not force:
        _fail(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, separators=(",", ":")) + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_save_dataset(rows, out: Path, force: bool) -> None:
    import datasets

    if out.exists() and not force:
        _fail(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        datasets.Dataset.from_list(rows).save_to_disk(str(staging / "data"))
        if out.exists():
            old = staging / "old"
            os.replace(out, old)  # the old copy is deleted only once the new one is in place
        os.replace(staging / "data", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@app.command()
def render(
    source: str = SOURCE_ARG,
    out: Path = typer.Option(..., "--out", help="Output: a .jsonl file, or a folder with --format datasets."),
    output_format: OutputFormat = typer.Option(OutputFormat.jsonl, "--format", help=(
        "jsonl: one {\"input_ids\", \"loss_mask\"} object per line (+ \"position_ids\" when packed). "
        "datasets: a datasets folder (save_to_disk) with the same columns.")),
    policy: MaskPolicy = POLICY_OPT,
    max_length: Optional[int] = MAX_LENGTH_OPT,
    pack: bool = typer.Option(False, "--pack", help="Pack several examples per row (needs --max-length)."),
    truncation: Truncation = TRUNCATION_OPT,
    on_error: OnError = ON_ERROR_OPT,
    reasoning_effort: Effort = EFFORT_OPT,
    split: str = SPLIT_OPT,
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    workers: int = WORKERS_OPT,
    drop_analysis: Optional[bool] = DROP_OPT,
):
    """Render conversations to token ids + loss masks (written atomically)."""
    examples, report, packed_rows = _build_and_pack(
        source, pack=pack, split=split, policy=policy, max_length=max_length, truncation=truncation,
        on_error=on_error, reasoning_effort=reasoning_effort.value, workers=workers, auto_drop_analysis=drop_analysis)
    if pack:
        rows = [row.to_dict() for row in packed_rows]
    else:
        rows = [example.to_dict() for example in examples]
    if output_format is OutputFormat.jsonl:
        _atomic_write_jsonl(rows, out, force)
    else:
        _atomic_save_dataset(rows, out, force)
    _print_report(report)
    stats = compute_stats(examples, packed_rows=packed_rows, max_length=max_length)
    extra = f" in {stats.packed_rows} packed rows ({stats.packing_efficiency:.1%} full)" if pack else ""
    console.print(f"wrote {len(rows)} rows to {out}: {stats.examples} examples, {stats.tokens} tokens, "
                  f"{stats.trained_fraction:.1%} trained{extra}", highlight=False)


def _runs(input_ids, loss_mask):
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or loss_mask[i] != loss_mask[start]:
            yield input_ids[start:i], bool(loss_mask[start])
            start = i


@app.command()
def inspect(
    source: str = SOURCE_ARG,
    index: int = typer.Option(0, "--index", min=0, help="Which example (0-based, in file order, blank lines skipped)."),
    policy: MaskPolicy = POLICY_OPT,
    reasoning_effort: Effort = EFFORT_OPT,
    split: str = SPLIT_OPT,
    plain: Optional[bool] = typer.Option(None, "--plain/--color", help=(
        "plain: mark trained tokens as [[...]] (default when stdout is not a terminal); color: highlight them.")),
    drop_analysis: Optional[bool] = DROP_OPT,
):
    """Show one example as Harmony text with the trained tokens highlighted."""
    from gptoss_train.harmony.encoding import load_harmony_encoding

    try:
        records = open_source(source, split=split)
        record = next((r for i, r in enumerate(records) if i == index), None)
    except DataSourceError as exc:
        _fail(str(exc), 2)
    if record is None:
        _fail(f"{source} has fewer than {index + 1} examples")
    try:
        # Rendered even when nothing is trained under the policy: seeing why is the point of inspect.
        conv = record_to_conversation(record, reasoning_effort=reasoning_effort.value)
    except DataError as exc:
        _fail(str(exc))
    example = render_for_training(conv, policy, auto_drop_analysis=drop_analysis)
    encoding = load_harmony_encoding()
    if plain is None:
        plain = not out_console.is_terminal
    if plain:
        pieces = []
        for ids, trained in _runs(example.input_ids, example.loss_mask):
            text = encoding.decode(ids)
            pieces.append(f"[[{text}]]" if trained else text)
        sys.stdout.write("".join(pieces) + "\n")
    else:
        text = Text()
        for ids, trained in _runs(example.input_ids, example.loss_mask):
            text.append(encoding.decode(ids), style="bold black on green" if trained else "dim")
        out_console.print(text)
    if not example.num_trained:
        console.print(f"note: nothing is trained in this example under policy {policy.value}", highlight=False)
    console.print(f"{record.source}:{record.location}: {len(example)} tokens, {example.num_trained} trained "
                  f"({example.num_trained / len(example):.1%}) under policy {policy.value}"
                  + (" — trained tokens are [[marked]]" if plain else " — trained tokens highlighted"),
                  highlight=False, markup=False)


@app.command()
def stats(
    source: str = SOURCE_ARG,
    policy: MaskPolicy = POLICY_OPT,
    max_length: Optional[int] = MAX_LENGTH_OPT,
    pack: bool = typer.Option(False, "--pack", help="Also report packing into rows of --max-length."),
    truncation: Truncation = TRUNCATION_OPT,
    on_error: OnError = typer.Option(OnError.SKIP, "--on-error", help="Malformed examples: skip (count) or error."),
    reasoning_effort: Effort = EFFORT_OPT,
    split: str = SPLIT_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON on stdout."),
    workers: int = WORKERS_OPT,
    drop_analysis: Optional[bool] = DROP_OPT,
):
    """Examples, tokens, trained-token fraction and the length histogram."""
    examples, report, packed_rows = _build_and_pack(
        source, pack=pack, split=split, policy=policy, max_length=max_length, truncation=truncation,
        on_error=on_error, reasoning_effort=reasoning_effort.value, workers=workers, auto_drop_analysis=drop_analysis)
    result = compute_stats(examples, packed_rows=packed_rows, max_length=max_length)
    if as_json:
        sys.stdout.write(json.dumps({"stats": result.to_dict(), "report": report.to_dict()}, indent=2) + "\n")
        return
    _print_report(report)
    table = Table("statistic", "value", title=f"{source} (policy {policy.value})", title_justify="left")
    table.add_row("examples", str(result.examples))
    table.add_row("tokens", str(result.tokens))
    table.add_row("trained tokens", f"{result.trained_tokens} ({result.trained_fraction:.1%})")
    table.add_row("length min / median / mean / p95 / max",
                  f"{result.min_length} / {result.median_length:.0f} / {result.mean_length:.1f} / "
                  f"{result.p95_length} / {result.max_length}")
    if result.packed_rows is not None:
        table.add_row(f"packed rows of {max_length}", f"{result.packed_rows} ({result.packing_efficiency:.1%} full)")
    out_console.print(table)
    if result.histogram:
        histogram = Table("length", "examples", "", title="length histogram", title_justify="left")
        peak = max(count for _, _, count in result.histogram) or 1
        for low, high, count in result.histogram:
            histogram.add_row(f"[{low}, {high})", str(count), "█" * round(30 * count / peak))
        out_console.print(histogram)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
