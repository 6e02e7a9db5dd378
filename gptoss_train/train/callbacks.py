"""Trainer callbacks: a rich progress bar with tokens/s and ETA, and the loss curve written as CSV + SVG + text."""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

SPARK = "▁▂▃▄▅▆▇█"


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary output files
    os.replace(tmp, path)


def loss_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) pairs from a trainer's log history, one per step (a resumed run's later entries win)."""
    by_step: dict[int, float] = {}
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            by_step[int(entry["step"])] = float(entry["loss"])
    return sorted(by_step.items())


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    if len(values) > width:  # average into `width` buckets
        size = len(values) / width
        values = [sum(values[int(i * size):max(int((i + 1) * size), int(i * size) + 1)])
                  / len(values[int(i * size):max(int((i + 1) * size), int(i * size) + 1)]) for i in range(width)]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * (len(SPARK) - 1) + 0.5))] for v in values)


def text_plot(curve: list[tuple[int, float]], *, width: int = 60, height: int = 10) -> str:
    """A small ASCII plot of loss against step (for terminals and logs)."""
    if not curve:
        return "(no loss logged)"
    steps = [s for s, _ in curve]
    losses = [v for _, v in curve]
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    grid = [[" "] * width for _ in range(height)]
    first, last = steps[0], steps[-1]
    for step, value in curve:
        x = 0 if last == first else int((step - first) / (last - first) * (width - 1))
        y = int((value - low) / span * (height - 1) + 0.5)
        grid[height - 1 - y][x] = "•"
    lines = []
    for row, cells in enumerate(grid):
        label = high - row * span / max(height - 1, 1)
        lines.append(f"{label:8.3f} │{''.join(cells)}")
    lines.append(" " * 9 + "└" + "─" * width)
    lines.append(" " * 10 + f"step {first}".ljust(width - 10) + f"{last}".rjust(10))
    return "\n".join(lines)


def svg_plot(curve: list[tuple[int, float]], *, width: int = 480, height: int = 240) -> str:
    """The loss curve as a standalone SVG (no plotting library needed)."""
    pad = 40
    if not curve:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"></svg>'
    steps = [s for s, _ in curve]
    losses = [v for _, v in curve]
    low, high = min(losses), max(losses)
    span_y = (high - low) or 1.0
    span_x = (steps[-1] - steps[0]) or 1
    points = " ".join(
        f"{pad + (s - steps[0]) / span_x * (width - 2 * pad):.1f},{height - pad - (v - low) / span_y * (height - 2 * pad):.1f}"
        for s, v in curve)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>\n'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>\n'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/>\n'
        f'<text x="{pad}" y="{pad - 8}">training loss (max {high:.3f}, min {low:.3f})</text>\n'
        f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">step {steps[-1]}</text>\n'
        f'<text x="{pad}" y="{height - pad + 16}">step {steps[0]}</text>\n</svg>\n')


def write_loss_curve(curve: list[tuple[int, float]], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out_dir)
    rows = ["step,loss"] + [f"{step},{loss:.6f}" for step, loss in curve]
    _atomic_write_text(out / "loss.csv", "\n".join(rows) + "\n")
    _atomic_write_text(out / "loss.svg", svg_plot(curve))
    return out / "loss.csv", out / "loss.svg"


def read_loss_csv(path: str | os.PathLike) -> list[tuple[int, float]]:
    with open(path, encoding="utf-8") as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]


class LossCurveCallback(TrainerCallback):
    """Keeps OUTPUT/loss.csv and loss.svg current (from the trainer state, so a resumed run has the whole curve)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            write_loss_curve(loss_curve(state.log_history), self.out_dir)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_loss_curve(loss_curve(state.log_history), self.out_dir)


class ThroughputCallback(TrainerCallback):
    """Records (seconds, tokens seen) at every step end, so the run summary can leave out the warm-up steps.

    The first steps of a GPU run include torch.compile / autotuning (26 s for step 1 of the 20b FSDP2 run), so an
    average over the whole run understates the rate a long run reaches.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.marks: list[tuple[int, float, int]] = []  # (global step, perf_counter, tokens seen by this process)

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [(state.global_step, time.perf_counter(), self.trainer.tokens_seen)]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((state.global_step, time.perf_counter(), self.trainer.tokens_seen))

    def steady_rate(self, warmup_steps: int | None = None) -> tuple[float, int, int] | None:
        """Tokens/s of this process over the steps after the warm-up: (rate, first step, last step), or None.

        Default warm-up: a tenth of the steps run, at least 1 and at most 20.
        """
        if len(self.marks) < 3:
            return None
        run = len(self.marks) - 1
        skip = warmup_steps if warmup_steps is not None else min(20, max(1, run // 10))
        skip = min(skip, run - 1)
        (step0, t0, tok0), (step1, t1, tok1) = self.marks[skip], self.marks[-1]
        if t1 <= t0:
            return None
        return (tok1 - tok0) / (t1 - t0), step0 + 1, step1


class RichProgressCallback(TrainerCallback):
    """One rich progress bar: step, loss, tokens/s (this process, non-pad tokens), ETA."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.progress = None
        self.task = None
        self.start_tokens = 0
        self.start_time = 0.0
        self.last_loss = float("nan")
        self.last_rate = 0.0
        self.window_start = (0.0, 0)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss=float("nan"), tps=0.0)
        self.start_tokens = self.trainer.tokens_seen
        self.start_time = time.perf_counter()
        self.window_start = (self.start_time, self.start_tokens)

    def tokens_per_second(self) -> float:
        """Rate since the previous log line (a whole-run average would carry the first steps' compile time)."""
        since, tokens = self.window_start
        elapsed = time.perf_counter() - since
        return (self.trainer.tokens_seen - tokens) / elapsed if elapsed > 0 else 0.0

    def shown_rate(self) -> float:
        """The bar's figure: the last completed window's rate, or the current window's before the first log."""
        return self.last_rate or self.tokens_per_second()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])
            # Batch jobs (SLURM, CI, the GPU runner) have no terminal: rich draws nothing there until the end, so
            # print one plain line per logging step instead.
            if self.progress is not None and not self.progress.console.is_terminal:
                elapsed = time.perf_counter() - self.start_time
                print(f"step {state.global_step}/{state.max_steps}  loss {self.last_loss:.4f}  "
                      f"{self.tokens_per_second():,.0f} tok/s  {elapsed:.0f} s", flush=True)
            self.last_rate = self.tokens_per_second()
            self.window_start = (time.perf_counter(), self.trainer.tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, loss=self.last_loss, tps=self.shown_rate())

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, tps=self.shown_rate())
            self.progress.stop()
            self.progress = None
