"""The llama.cpp backend on a GGUF exported from the tiny checkpoint (needs the llamacpp extra)."""

import pytest

pytest.importorskip("llama_cpp")

from gptoss_train.eval.backends import load_backend  # noqa: E402
from gptoss_train.eval.core import GenerationRequest  # noqa: E402

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]  # GGUF export + llama.cpp load: ~15-25 s on 2 cores


def test_gguf_greedy_agrees_with_transformers(tiny_checkpoint, tiny_local_backend, tmp_path):
    from gptoss_train.export import export_model

    gguf = export_model(str(tiny_checkpoint), out_dir=tmp_path / "tiny.gguf", format="gguf")
    backend = load_backend(str(gguf), n_ctx=512)
    try:
        request = GenerationRequest(messages=[{"role": "user", "content": "What is 2+2?"}], reasoning_effort="low",
                                    max_tokens=12, temperature=0.0)
        ours = backend.generate(request)
        reference = tiny_local_backend.generate(request)
        assert backend.describe()["model_fingerprint"]
    finally:
        backend.close()
    assert len(ours.tokens) == 12 and ours.finish_reason == "truncated"
    # llama.cpp quantizes activations in its MXFP4 matmuls (cpu-gotchas §20): compare the first greedy tokens only
    assert ours.tokens[:4] == reference.tokens[:4]
