"""A GGUF in this process through llama-cpp-python (the ``llamacpp`` extra).

We feed the Harmony-rendered ids directly (llama.cpp's tokenizer agrees with Harmony on special tokens,
cpu-gotchas §23), so the GGUF sees the same prompt as every other backend, and we stop on ``<|return|>``/``<|call|>``.
"""

from __future__ import annotations

import threading
import time

from gptoss_train.eval.core import Backend, GenerationRequest, GenerationResult
from gptoss_train.eval.harmony_io import prompt_tokens, result_from_tokens
from gptoss_train.harmony.encoding import ASSISTANT_STOP_TOKENS


class LlamaCppBackend(Backend):
    name = "llamacpp"
    OPTIONS = ("n_ctx", "n_gpu_layers", "n_threads")

    def __init__(self, gguf_path: str, *, n_ctx: int = 8192, n_gpu_layers: int = 0, n_threads: int | None = None):
        try:
            import llama_cpp
        except ImportError as exc:
            raise ImportError(
                "a .gguf model needs llama-cpp-python: pip install 'gptoss-train[llamacpp]' "
                "(builds llama.cpp, 5-9 minutes on 2 cores)"
            ) from exc
        self.gguf_path = str(gguf_path)
        self.llm = llama_cpp.Llama(model_path=self.gguf_path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                                   n_threads=n_threads, verbose=False, logits_all=False)
        self._lock = threading.Lock()  # one llama context: one generation at a time

    def generate(self, request: GenerationRequest) -> GenerationResult:
        prompt = prompt_tokens(request)
        started = time.perf_counter()
        completion: list[int] = []
        greedy = request.temperature <= 0
        with self._lock:
            if request.seed is not None:
                self.llm.set_seed(request.seed)
            for token in self.llm.generate(prompt, temp=0.0 if greedy else request.temperature,
                                           top_p=1.0 if greedy else request.top_p, top_k=1 if greedy else 0,
                                           min_p=0.0, repeat_penalty=1.0, reset=True):
                completion.append(int(token))
                if token in ASSISTANT_STOP_TOKENS or len(completion) >= request.max_tokens:
                    break
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(completion),
                 "seconds": time.perf_counter() - started}
        return result_from_tokens(completion, usage=usage)

    def close(self) -> None:
        """Free the llama.cpp model now (left to interpreter shutdown, llama-cpp-python 0.3 prints a TypeError)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def describe(self) -> dict:
        from gptoss_train.eval.results import fingerprint_path

        return {"backend": "llamacpp", "model": self.gguf_path, "model_fingerprint": fingerprint_path(self.gguf_path)}
