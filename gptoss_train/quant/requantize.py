"""Requantize tuned expert weights back to MXFP4, keeping what did not change byte for byte.

A gpt-oss checkpoint stores every expert matrix as MXFP4 ``_blocks``/``_scales`` (formats.md §1.2). After LoRA or full
fine-tuning the experts are dense; to ship the model in its native format we must quantize them again. Two rules
(DESIGN.md §1, decision 3):

* An expert whose decoded values equal the tuned values (nobody changed it) keeps its **original bytes**. Decoding and
  re-encoding would give the same values but not always the same bytes (non-canonical blocks, sign of zero; formats.md
  §3.4), and byte identity is what lets users check that untouched experts really are untouched.
* A changed expert is encoded with the canonical rule (``mxfp4.encode``) and ``keep_scales`` = the original scales, so a
  small nudge does not make a block jump to the next scale. Within it, a block whose values did not change keeps its
  bytes as well.

Each tensor gets a report that says how much of the fine-tune survived: relative quantization error, fraction of
32-element blocks whose bytes changed, and the kept share of the fine-tuning delta Δ = W − W0, measured as the cosine
and norm ratio of Q(W0 + Δ) − W0 against Δ. A cosine near 0 means requantization erased the fine-tune (the reason for
QAT, see :mod:`gptoss_train.quant.qat`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gptoss_train.quant import mxfp4

# Experts are decoded and compared this many at a time: bounds memory at 20b/120b shapes (one 20b gate_up expert is
# 5760 x 2880 float32 = 66 MB) while keeping the per-call overhead low.
DEFAULT_EXPERT_CHUNK = 8


@dataclass
class TensorRequantReport:
    """What requantization did to one expert tensor (all experts of one layer's gate_up or down projection)."""

    name: str
    experts: int
    experts_changed: int
    blocks: int
    blocks_changed: int
    rel_error: float  # ||Q(W) - W|| / ||W||: the quantization error of the whole tensor (0 when nothing changed)
    delta_rel_norm: float  # ||Δ|| / ||W0||: how big the fine-tune was
    delta_cosine: float | None  # cos(Q(W) - W0, Δ); None when Δ = 0
    delta_norm_ratio: float | None  # ||Q(W) - W0|| / ||Δ||; None when Δ = 0
    error_to_delta: float | None  # ||Q(W) - W|| / ||Δ||: >1 means the rounding noise outweighs the fine-tune

    @property
    def blocks_changed_fraction(self) -> float:
        return self.blocks_changed / self.blocks if self.blocks else 0.0


@dataclass
class RequantReport:
    """Per-tensor reports of one export, plus the rule used."""

    rule: str
    tensors: list[TensorRequantReport] = field(default_factory=list)

    def summary(self) -> dict:
        experts = sum(t.experts for t in self.tensors)
        changed = sum(t.experts_changed for t in self.tensors)
        blocks = sum(t.blocks for t in self.tensors)
        blocks_changed = sum(t.blocks_changed for t in self.tensors)
        cosines = [t.delta_cosine for t in self.tensors if t.delta_cosine is not None]
        ratios = [t.delta_norm_ratio for t in self.tensors if t.delta_norm_ratio is not None]
        return {
            "rule": self.rule,
            "tensors": len(self.tensors),
            "experts": experts,
            "experts_changed": changed,
            "blocks_changed_fraction": blocks_changed / blocks if blocks else 0.0,
            "mean_delta_cosine": sum(cosines) / len(cosines) if cosines else None,
            "mean_delta_norm_ratio": sum(ratios) / len(ratios) if ratios else None,
            "max_rel_error": max((t.rel_error for t in self.tensors), default=0.0),
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "tensors": [asdict(t) | {"blocks_changed_fraction": t.blocks_changed_fraction} for t in self.tensors],
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write the report atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
        return path

    def rich_table(self, *, max_rows: int = 60):
        """A rich Table: one row per tensor (changed tensors first when there are more than ``max_rows``)."""
        from rich.table import Table

        table = Table(title=f"MXFP4 requantization (rule={self.rule})", show_lines=False)
        for column, justify in (
            ("tensor", "left"),
            ("experts changed", "right"),
            ("blocks changed", "right"),
            ("rel error", "right"),
            ("|Δ|/|W0|", "right"),
            ("Δ kept (cos)", "right"),
            ("Δ norm ratio", "right"),
        ):
            table.add_column(column, justify=justify)
        rows = sorted(self.tensors, key=lambda t: -t.experts_changed) if len(self.tensors) > max_rows else self.tensors

        def fmt(value, spec=".3g"):
            return "-" if value is None else format(value, spec)

        for t in rows[:max_rows]:
            table.add_row(
                t.name,
                f"{t.experts_changed}/{t.experts}",
                f"{t.blocks_changed_fraction:.2%}",
                fmt(t.rel_error),
                fmt(t.delta_rel_norm),
                fmt(t.delta_cosine, ".3f"),
                fmt(t.delta_norm_ratio, ".3f"),
            )
        if len(rows) > max_rows:
            table.caption = f"{len(rows) - max_rows} more tensors in the JSON report"
        return table


def _safe_ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator <= 0.0 else numerator / denominator


def requantize_experts(
    name: str,
    base_blocks: torch.Tensor,
    base_scales: torch.Tensor,
    new_weight: torch.Tensor,
    *,
    rule: str = "best",
    expert_chunk: int = DEFAULT_EXPERT_CHUNK,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, TensorRequantReport]:
    """Quantize ``new_weight`` ([E, out, in], any float dtype) against the base's ``_blocks``/``_scales``.

    Returns uint8 blocks [E, out, in/32, 16], scales [E, out, in/32] (on the CPU) and the tensor's report. Experts whose
    values did not change come back with the input bytes; the others are encoded with ``rule`` keeping the original
    scales where the new values fit (``mxfp4.encode(keep_scales=...)``).
    """
    if base_blocks.dtype != torch.uint8 or base_scales.dtype != torch.uint8:
        raise TypeError(f"{name}: base blocks/scales must be uint8, got {base_blocks.dtype}/{base_scales.dtype}")
    experts, rows, groups, _ = base_blocks.shape
    expected = (experts, rows, groups * 32)
    if tuple(new_weight.shape) != expected:
        raise ValueError(
            f"{name}: tuned weight has shape {tuple(new_weight.shape)}, the base's blocks imply [E, out, in] = "
            f"{list(expected)}; dense HF experts are [E, in, out] and must be transposed first"
        )
    device = torch.device(device) if device is not None else new_weight.device
    out_blocks = base_blocks.clone()
    out_scales = base_scales.clone()
    changed_experts = 0
    blocks_changed = 0
    sums = dict(err2=0.0, w2=0.0, w02=0.0, d2=0.0, dq2=0.0, dot=0.0)

    for start in range(0, experts, expert_chunk):
        stop = min(start + expert_chunk, experts)
        blocks0 = base_blocks[start:stop].to(device)
        scales0 = base_scales[start:stop].to(device)
        w0 = mxfp4.decode(blocks0, scales0, dtype=torch.float32)
        w = new_weight[start:stop].to(device=device, dtype=torch.float32)
        sums["w02"] += float(w0.square().sum())
        sums["w2"] += float(w.square().sum())
        unchanged = (w0 == w).flatten(1).all(dim=1)
        changed = (~unchanged).nonzero().flatten()
        if changed.numel() == 0:
            continue
        w_changed = w[changed]
        blocks_new, scales_new = mxfp4.encode(w_changed, rule=rule, keep_scales=scales0[changed])
        wq = mxfp4.decode(blocks_new, scales_new, dtype=torch.float32)
        # A block whose values came back unchanged keeps its original bytes too (they can differ only in the sign
        # of a zero or a non-canonical scale), so "bytes changed" means "values changed".
        same_values = (wq == w0[changed]).unflatten(-1, (-1, mxfp4.BLOCK_SIZE)).all(dim=-1)
        blocks_new = torch.where(same_values.unsqueeze(-1), blocks0[changed], blocks_new)
        scales_new = torch.where(same_values, scales0[changed], scales_new)
        delta = w_changed - w0[changed]
        delta_q = wq - w0[changed]
        sums["err2"] += float((wq - w_changed).square().sum())
        sums["d2"] += float(delta.square().sum())
        sums["dq2"] += float(delta_q.square().sum())
        sums["dot"] += float((delta_q * delta).sum())
        differs = (blocks_new != blocks0[changed]).any(dim=-1) | (scales_new != scales0[changed])
        blocks_changed += int(differs.sum())
        changed_experts += int(changed.numel())
        index = changed.cpu() + start
        out_blocks[index] = blocks_new.cpu()
        out_scales[index] = scales_new.cpu()

    delta_norm = math.sqrt(sums["d2"])
    report = TensorRequantReport(
        name=name,
        experts=experts,
        experts_changed=changed_experts,
        blocks=experts * rows * groups,
        blocks_changed=blocks_changed,
        rel_error=_safe_ratio(math.sqrt(sums["err2"]), math.sqrt(sums["w2"])) or 0.0,
        delta_rel_norm=_safe_ratio(delta_norm, math.sqrt(sums["w02"])) or 0.0,
        delta_cosine=_safe_ratio(sums["dot"], delta_norm * math.sqrt(sums["dq2"])) if sums["dq2"] > 0 else (
            0.0 if delta_norm > 0 else None
        ),
        delta_norm_ratio=_safe_ratio(math.sqrt(sums["dq2"]), delta_norm),
        error_to_delta=_safe_ratio(math.sqrt(sums["err2"]), delta_norm),
    )
    return out_blocks, out_scales, report


def dense_to_out_in(weight: torch.Tensor) -> torch.Tensor:
    """HF dense experts are stored [E, in, out] (used as ``x @ W``); MXFP4 blocks run along ``in`` of [E, out, in]."""
    return weight.transpose(-1, -2)
