"""The commands shown in README.md, configs/, recipes/, evals/ READMEs and docs/ must run as written.

Every fenced ``bash``/``sh`` block is executed in a scratch copy of the paths it needs, with ``.venv/bin`` first on
PATH. A block opts out only with a first-line comment naming why:

* ``# gpu`` — needs a CUDA device (run on the GPU machine; see docs/benchmarks.md for the recorded runs);
* ``# docs-test: skip <reason>`` — e.g. the README's own test command (that is what CI runs) or a hub download.

Blocks run in order per file, in one shell, so a later block may use what an earlier one produced.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [
    "README.md",
    "configs/README.md",
    "recipes/README.md",
    "evals/README.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "evals").glob("*/README.md")),
]
FENCE = re.compile(r"^```(bash|sh|shell)[^\n]*\n(.*?)^```", re.S | re.M)
SKIP_MARK = re.compile(r"^\s*#\s*(gpu\b|docs-test:\s*skip\b)")


def shell_blocks(text: str) -> list[tuple[str, bool]]:
    """(block, runnable) for each fenced shell block."""
    blocks = []
    for match in FENCE.finditer(text):
        body = match.group(2)
        first = body.strip().splitlines()[0] if body.strip() else ""
        blocks.append((body, not SKIP_MARK.match(first)))
    return blocks


def test_fence_parser_honours_skip_marks():
    text = "```bash\n# gpu\nnvidia-smi\n```\n\n```bash\necho hi\n```\n```python\nprint(1)\n```\n"
    assert shell_blocks(text) == [("# gpu\nnvidia-smi\n", False), ("echo hi\n", True)]


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOC_FILES if (REPO / d).is_file()])
def test_documented_commands_run(doc, tmp_path):
    blocks = [body for body, runnable in shell_blocks((REPO / doc).read_text()) if runnable]
    if not blocks:
        pytest.skip(f"{doc} shows no runnable shell commands")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    # Commands refer to repo paths (configs/, recipes/, scripts/); run from the repo root, but send every output
    # they write under a scratch folder: docs use $DOCS_OUT (default ./out) for outputs.
    env["DOCS_OUT"] = str(tmp_path)
    script = "set -euo pipefail\n" + "\n".join(blocks)
    result = subprocess.run(
        ["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"commands in {doc} failed (exit {result.returncode}).\n--- script ---\n{script}\n"
        f"--- stdout (tail) ---\n{result.stdout[-3000:]}\n--- stderr (tail) ---\n{result.stderr[-3000:]}"
    )
