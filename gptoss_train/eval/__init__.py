"""gptoss-eval: backends (local, OpenAI-compatible server, llama.cpp, oracle), suites, cache/resume, reports.

    from gptoss_train.eval import run_suite
    results = run_suite("gsm8k", model="oracle", data="bundled", out_dir="runs/check")
"""

from gptoss_train.eval.core import get_suite, suite_names
from gptoss_train.eval.runner import run_suite

__all__ = ["get_suite", "run_suite", "suite_names"]
