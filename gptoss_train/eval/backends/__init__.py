"""Backends and the ``--model`` spec that picks one.

=====================================  ===========================================================
spec                                   backend
=====================================  ===========================================================
``oracle``                             :class:`~.oracle.OracleBackend`: the suite's gold answers
``http://host:port/v1`` / ``https://`` :class:`~.openai_compat.OpenAIBackend` (vLLM, Ollama, llama.cpp server)
``path/to/model.gguf``                 :class:`~.llamacpp.LlamaCppBackend` (llama-cpp-python in process)
a local folder or a hub id             :class:`~.local.LocalBackend` (transformers, optional PEFT adapter)
=====================================  ===========================================================
"""

from __future__ import annotations

from pathlib import Path

from gptoss_train.eval.core import Backend


class BackendError(RuntimeError):
    """A backend could not be created (bad spec, missing file, missing optional dependency)."""


def backend_kind(spec: str) -> str:
    spec = str(spec)
    if spec == "oracle":
        return "oracle"
    if spec.startswith(("http://", "https://")):
        return "openai"
    if spec.lower().endswith(".gguf"):
        return "llamacpp"
    return "local"


def load_backend(spec: str, *, suite=None, **options) -> Backend:
    """Create the backend a ``--model`` spec names. ``options`` go to the backend's constructor
    (``adapter``, ``experts``, ``device``, ``dtype``, ``api``, ``api_key``, ``served_model``, ``concurrency``, ...)."""
    kind = backend_kind(spec)
    if kind == "oracle":
        from gptoss_train.eval.backends.oracle import OracleBackend

        if suite is None:
            raise BackendError("--model oracle needs a suite (it replays that suite's gold answers)")
        return OracleBackend(suite)
    if kind == "openai":
        from gptoss_train.eval.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(spec, **_pick(options, OpenAIBackend.OPTIONS))
    if kind == "llamacpp":
        if not Path(spec).is_file():
            raise BackendError(f"GGUF file {spec} does not exist")
        from gptoss_train.eval.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(spec, **_pick(options, LlamaCppBackend.OPTIONS))
    from gptoss_train.eval.backends.local import LocalBackend

    return LocalBackend(spec, **_pick(options, LocalBackend.OPTIONS))


def _pick(options: dict, accepted: tuple[str, ...]) -> dict:
    return {key: value for key, value in options.items() if key in accepted and value is not None}


__all__ = ["BackendError", "backend_kind", "load_backend"]
