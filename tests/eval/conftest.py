"""Fixtures of the eval tests: the tiny checkpoint loaded once, through the local backend's own loader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# fake_openai_server.py sits beside the tests (a helper module, not a test)
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_local_backend(tiny_checkpoint):
    """LocalBackend on the tiny checkpoint (float32 on CPU, transformers generate), shared by the eval tests."""
    from gptoss_train.eval.backends.local import LocalBackend

    return LocalBackend(str(tiny_checkpoint), device="cpu", batch_size=2)
