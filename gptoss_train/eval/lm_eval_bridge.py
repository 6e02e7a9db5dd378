"""lm-evaluation-harness bridge: ``--model gptoss`` with Harmony prompts and the final channel as the answer.

Run lm-eval through this module so the model type is registered (lm-eval's CLI only knows its own models)::

    python -m gptoss_train.eval.lm_eval_bridge --model gptoss \\
        --model_args pretrained=openai/gpt-oss-20b,reasoning_effort=low,max_gen_toks=8192 \\
        --tasks gsm8k --apply_chat_template --fewshot_as_multiturn

or from Python: ``import gptoss_train.eval.lm_eval_bridge`` then ``lm_eval.simple_evaluate(model="gptoss", ...)``.

model_args: ``pretrained`` (any ``--model`` spec of gptoss-eval: local folder / hub id, ``http(s)://`` server,
``*.gguf``), ``adapter``, ``reasoning_effort`` (low|medium|high), ``max_gen_toks`` (the whole turn's budget,
analysis included: reasoning models need far more than a task's answer length, so the task's own ``max_gen_toks``
is ignored unless ``respect_task_max_gen_toks=True``), ``temperature`` (default 0), ``top_p``, ``seed``,
``experts`` (bf16|mxfp4), ``device``, ``batch_size``, ``api``, ``concurrency``.

* ``generate_until``: the context becomes a user message (or, with ``--apply_chat_template``, the few-shot chat
  turns themselves), rendered by our Harmony renderer; the answer is the FINAL channel, cut at the task's ``until``
  strings. A turn without a final message answers "" (scored wrong, never the analysis).
* ``loglikelihood``: the continuation's log-probability after ``<|start|>assistant<|channel|>final<|message|>``
  following the Harmony-rendered context (no analysis: the answer is scored as a direct final answer). Needs a
  local model.
* ``loglikelihood_rolling``: plain text log-probability (no Harmony), for perplexity tasks. Needs a local model.
"""

from __future__ import annotations

import json
import logging

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from gptoss_train.eval.core import Backend, GenerationRequest
from gptoss_train.harmony.encoding import STARTOFTEXT, load_harmony_encoding

logger = logging.getLogger(__name__)

# apply_chat_template hands the chat to generate_until as a string; this prefix marks it so we can rebuild the turns
# and render them with Harmony (rather than flattening few-shot turns into one user message).
_CHAT_MARKER = "__gptoss_chat__:"
_BACKEND_ARGS = ("adapter", "experts", "device", "dtype", "batch_size", "api", "api_key", "served_model",
                 "concurrency", "timeout")


@register_model("gptoss")
class GptOssLM(LM):
    def __init__(self, pretrained: str | None = None, *, backend: Backend | None = None,
                 reasoning_effort: str = "medium", max_gen_toks: int = 4096, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, respect_task_max_gen_toks: bool = False,
                 developer_instructions: str | None = None, **kwargs):
        super().__init__()
        if backend is None:
            if not pretrained:
                raise ValueError("gptoss: pass model_args pretrained=PATH_OR_URL")
            from gptoss_train.eval.backends import load_backend

            options = {k: kwargs.pop(k) for k in list(kwargs) if k in _BACKEND_ARGS and kwargs[k] is not None}
            if "batch_size" in options:
                try:
                    options["batch_size"] = int(options["batch_size"])
                except (TypeError, ValueError):  # lm-eval's "auto"
                    options.pop("batch_size")
            backend = load_backend(str(pretrained), **options)
        if kwargs:
            logger.info("gptoss: ignoring lm-eval arguments %s", sorted(kwargs))
        self.backend = backend
        self.reasoning_effort = reasoning_effort
        self.max_gen_toks = int(max_gen_toks)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = int(seed) if seed is not None else None
        self.respect_task_max_gen_toks = str(respect_task_max_gen_toks).lower() in ("1", "true", "yes")
        self.developer_instructions = developer_instructions

    # ------------------------------------------------------------------ chat template hooks
    @property
    def tokenizer_name(self) -> str:
        return "o200k_harmony"

    def chat_template(self, chat_template=False) -> str:
        return "harmony"

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return _CHAT_MARKER + json.dumps(chat_history)

    def _messages(self, context: str) -> list[dict]:
        if context.startswith(_CHAT_MARKER):
            messages = json.loads(context[len(_CHAT_MARKER):])
            # lm-eval may put the task description in a system turn: Harmony's system message is the model's own,
            # so task instructions go to the developer message (conversation_from_chat handles "system" that way).
            return messages
        return [{"role": "user", "content": context}]

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        generation_requests, stops = [], []
        for instance in requests:
            context, gen_kwargs = instance.args[0], dict(instance.args[1] if len(instance.args) > 1 else {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = self.max_gen_toks
            if self.respect_task_max_gen_toks and gen_kwargs.get("max_gen_toks"):
                budget = int(gen_kwargs["max_gen_toks"])
            temperature = float(gen_kwargs.get("temperature", self.temperature))
            if gen_kwargs.get("do_sample") is False:
                temperature = 0.0
            generation_requests.append(GenerationRequest(
                messages=self._messages(context), reasoning_effort=self.reasoning_effort,
                developer_instructions=self.developer_instructions, max_tokens=budget, temperature=temperature,
                top_p=self.top_p, seed=self.seed, suite="lm-eval", sample_id=str(getattr(instance, "doc_id", ""))))
            stops.append(until)
        results = self.backend.generate_batch(generation_requests)
        answers = []
        for result, until in zip(results, stops):
            answer = result.final or ""
            for stop in until:
                if stop and stop in answer:
                    answer = answer[: answer.index(stop)]
            answers.append(answer)
        return answers

    # ------------------------------------------------------------------ scoring
    def _local_model(self):
        model = getattr(self.backend, "model", None)
        if model is None:
            raise NotImplementedError(
                "gptoss: loglikelihood tasks need a local model (pretrained=FOLDER or hub id); servers and GGUFs "
                "support generate_until tasks only"
            )
        return model

    def _continuation_logprob(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
        import torch

        model = self._local_model()
        device = next(model.parameters()).device
        ids = torch.tensor([context_ids + continuation_ids], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(context_ids) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(continuation_ids, device=device)
        total = logprobs.gather(1, target[:, None]).sum().item()
        greedy = bool((logprobs.argmax(dim=-1) == target).all().item())
        return total, greedy

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from gptoss_train.eval.harmony_io import encode_with_specials, prompt_tokens

        encoding = load_harmony_encoding()
        final_header = encode_with_specials("<|channel|>final<|message|>")
        outputs = []
        for instance in requests:
            context, continuation = instance.args[0], instance.args[1]
            request = GenerationRequest(messages=self._messages(context), reasoning_effort=self.reasoning_effort,
                                        developer_instructions=self.developer_instructions)
            context_ids = prompt_tokens(request) + final_header
            # lm-eval continuations usually start with a space ("Answer: Paris" -> " Paris"); after <|message|>
            # the answer starts the message, so the separator space is dropped.
            continuation_ids = encoding.encode(continuation.lstrip(" ") or continuation)
            outputs.append(self._continuation_logprob(context_ids, continuation_ids))
        return outputs

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        encoding = load_harmony_encoding()
        model = self._local_model()
        window = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
        outputs = []
        for instance in requests:
            tokens = encoding.encode(instance.args[0])
            total, previous = 0.0, [STARTOFTEXT]
            for start in range(0, len(tokens), window - 1):
                piece = tokens[start : start + window - 1]
                logprob, _ = self._continuation_logprob(previous[-1:], piece)
                total += logprob
                previous = piece
            outputs.append(total)
        return outputs


def main() -> None:
    """``python -m gptoss_train.eval.lm_eval_bridge <lm_eval arguments>`` with ``--model gptoss`` available."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
