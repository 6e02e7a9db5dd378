"""BFCL (Berkeley Function Calling Leaderboard) single-turn categories: data from PyPI ``bfcl-eval``, our AST checker.

Our checker re-implements the official one (``bfcl_eval/eval_checker/ast_eval/ast_checker.py``) so grading needs
neither bfcl-eval's model-handler stack (which imports every provider SDK at import time) nor network access;
tests/eval/test_bfcl_checker.py runs the official checker side by side on real entries to keep the verdicts equal.
"""
