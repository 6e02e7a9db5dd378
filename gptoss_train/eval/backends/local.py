"""The model in this process: transformers ``GptOssForCausalLM`` loaded by ``gptoss_train.model.load`` (bf16, or
MXFP4-resident experts), with an optional PEFT adapter.

Generation: on CUDA the project's fast decode path (``gptoss_train.kernels.generation.FastGenerator``) when it is
importable, else ``model.generate`` (batched, left-padded). The path taken is logged and recorded in the results.
Prompts are Harmony ids from the shared renderer; a turn stops on ``<|return|>`` or ``<|call|>``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from gptoss_train.eval.core import Backend, GenerationRequest, GenerationResult
from gptoss_train.eval.harmony_io import prompt_tokens, result_from_tokens
from gptoss_train.harmony.encoding import ASSISTANT_STOP_TOKENS, ENDOFTEXT

logger = logging.getLogger(__name__)


class LocalBackend(Backend):
    name = "local"
    OPTIONS = ("adapter", "experts", "device", "dtype", "batch_size", "generation_path", "model_object")

    def __init__(self, model_path: str, *, adapter: str | None = None, experts: str = "bf16", device: str | None = None,
                 dtype=None, batch_size: int | None = None, generation_path: str = "auto", model_object=None):
        import torch

        self.model_path = str(model_path)
        self.adapter = str(adapter) if adapter else None
        self.experts = experts
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # CPU: small batches (the 201k-vocab logits dominate memory); GPU: enough rows to keep the device busy.
        self.batch_size = max(1, int(batch_size or (64 if str(self.device).startswith("cuda") else 4)))
        if model_object is not None:  # an already loaded model (quickstart, lm-eval bridge, tests)
            self.model = model_object
        else:
            from gptoss_train.model.load import load_model

            self.model = load_model(self.model_path, experts=experts, dtype=dtype, device=self.device)
            if self.adapter:
                from peft import PeftModel

                if not (Path(self.adapter) / "adapter_config.json").is_file():
                    raise FileNotFoundError(
                        f"--adapter {self.adapter}: no adapter_config.json there (expected a PEFT adapter folder)"
                    )
                self.model = PeftModel.from_pretrained(self.model, self.adapter)
        self.model.eval()
        self.generation_path = self._pick_generation_path(generation_path)
        logger.info("local backend: %s on %s, generation path: %s", self.model_path, self.device, self.generation_path)
        self._fast = None

    def _pick_generation_path(self, requested: str) -> str:
        if requested not in ("auto", "fast", "hf"):
            raise ValueError(f"generation_path must be auto, fast or hf, got {requested!r}")
        if requested == "hf":
            return "hf"
        try:
            from gptoss_train.kernels.generation import fast_generation_available
        except ImportError as exc:  # the kernels package is optional at eval time
            if requested == "fast":
                raise
            logger.info("fast generation not importable (%s); using transformers generate", exc)
            return "hf"
        if fast_generation_available(self.model):
            return "fast"
        if requested == "fast":
            raise ValueError("generation_path='fast' needs CUDA and a model the fast path supports")
        if str(self.device).startswith("cuda"):
            logger.warning("fast CUDA generation does not support this model; using transformers generate")
        return "hf"

    # ------------------------------------------------------------------ generation
    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.generate_batch([request])[0]

    def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        prompts = [prompt_tokens(request) for request in requests]
        # Requests sharing sampling settings go in one batch; sorting by length keeps padding small.
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            key = (request.max_tokens, request.temperature, request.top_p, request.seed)
            groups.setdefault(key, []).append(index)
        for (max_tokens, temperature, top_p, seed), indices in groups.items():
            indices.sort(key=lambda i: len(prompts[i]))
            # The fast path batches continuously over its own cache slots: give it the whole group at once.
            step = len(indices) if self.generation_path == "fast" else self.batch_size
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                started = time.perf_counter()
                completions = self._generate_ids([prompts[i] for i in chunk], max_tokens=max_tokens,
                                                 temperature=temperature, top_p=top_p, seed=seed)
                seconds = (time.perf_counter() - started) / len(chunk)
                for i, completion in zip(chunk, completions):
                    usage = {"prompt_tokens": len(prompts[i]), "completion_tokens": len(completion),
                             "seconds": seconds}
                    results[i] = result_from_tokens(completion, usage=usage)
        return results  # type: ignore[return-value]

    def _generate_ids(self, prompts: list[list[int]], *, max_tokens: int, temperature: float, top_p: float,
                      seed: int | None) -> list[list[int]]:
        if self.generation_path == "fast":
            needed = max(len(p) for p in prompts) + max_tokens + 1
            if self._fast is None or self._fast.max_seq_len < needed:
                from gptoss_train.kernels.generation import FastGenerator

                # KV cache sized for this request group, rounded up so later groups usually reuse it.
                max_seq_len = 1 << (needed - 1).bit_length()
                self._fast = FastGenerator(self.model, max_batch=self.batch_size, max_seq_len=max_seq_len)
            return [list(ids) for ids in self._fast.generate(prompts, max_new_tokens=max_tokens,
                                                            temperature=temperature, top_p=top_p, seed=seed,
                                                            stop_ids=tuple(ASSISTANT_STOP_TOKENS))]
        return self.hf_generate(prompts, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def hf_generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int | None = None) -> list[list[int]]:
        """Batched ``model.generate`` with left padding; each completion is cut after its first stop token."""
        import torch

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), ENDOFTEXT, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        device = next(self.model.parameters()).device
        sampling = temperature > 0
        kwargs = dict(max_new_tokens=max_tokens, do_sample=sampling, eos_token_id=list(ASSISTANT_STOP_TOKENS),
                      pad_token_id=ENDOFTEXT)
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p)
            if seed is not None:
                torch.manual_seed(seed)
        else:  # silence generation_config sampling defaults that do not apply to greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            output = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                         **kwargs)
        completions = []
        for row in output[:, width:].tolist():
            cut = []
            for token in row:
                cut.append(token)
                if token in ASSISTANT_STOP_TOKENS:
                    break
            else:
                while cut and cut[-1] == ENDOFTEXT:  # padding after a row that finished early without a stop token
                    cut.pop()
            completions.append(cut)
        return completions

    def describe(self) -> dict:
        from gptoss_train.eval.results import fingerprint_path

        info = {"backend": "local", "model": self.model_path, "experts": self.experts, "device": str(self.device),
                "generation_path": self.generation_path}
        if Path(self.model_path).exists():
            info["model_fingerprint"] = fingerprint_path(self.model_path)
        if self.adapter:
            info["adapter"] = self.adapter
            info["adapter_fingerprint"] = fingerprint_path(self.adapter)
        return info
