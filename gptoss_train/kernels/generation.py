"""Fast local generation for gpt-oss (the gptoss-eval local backend calls this on CUDA).

    gen = FastGenerator(model, max_batch=64, max_seq_len=8192)
    completions = gen.generate(prompt_ids_list, max_new_tokens=4096, temperature=1.0, top_p=1.0, seed=0)

Continuous batching over a fixed number of cache slots: prompts wait in a queue, are prefilled (packed, several per
forward) into free slots, and every live slot advances one token per decode step. A slot is freed when its sequence
hits a stop token (`<|return|>` 200002 / `<|call|>` 200012 by default), `max_new_tokens` or the cache length, and is
refilled from the queue before the next step. On CUDA each decode step is one CUDA-graph replay per (batch bucket,
KV-length bucket); the step itself never synchronises with the host. The host reads the sampled tokens once per step
to decide stops. Design, profile and gaps: docs/fast-generation.md.
"""

from __future__ import annotations

import bisect
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from gptoss_train.kernels.gen_model import (
    KVCache,
    ModelWeights,
    UnsupportedModel,
    collect_weights,
    decode_step,
    decode_step_fused,
    fused_decode_supported,
    grouped_mm_supported,
    prefill,
    unwrap_peft,
)

RETURN_ID = 200002
CALL_ID = 200012


def fast_generation_available(model) -> bool:
    """True when CUDA is present, the model lives there and every part of it (adapter included) is supported."""
    if not torch.cuda.is_available():
        return False
    try:
        base = unwrap_peft(model)
        if getattr(base.config, "model_type", None) != "gpt_oss":
            return False
        if base.model.embed_tokens.weight.device.type != "cuda":
            return False
        collect_weights(model, max_seq_len=1, keep_mxfp4=True)  # structure only: decodes nothing
    except (UnsupportedModel, AttributeError, ImportError):
        return False
    return True


@dataclass
class _Sequence:
    index: int  # position in the caller's prompt list
    prompt_len: int
    completion: list[int] = field(default_factory=list)
    launched: int = 0  # decode steps launched for it; step j feeds completion[j] at position prompt_len + j
    done: bool = False


@dataclass
class GenerationStats:
    """Wall-clock split of the last generate() call (host timers around synchronised phases)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0  # tokens produced by decode steps (first tokens come from prefill)
    first_token_s: float | None = None  # from the call's start until the first sequence had its first token
    graphs_captured: int = 0
    capture_s: float = 0.0  # part of decode_s spent capturing graphs (first use of a batch/length bucket)
    fused_error: str | None = None  # why the fused decode kernels were switched off, if they were


def _length_buckets(max_seq_len: int) -> list[int]:
    # Powers of two up to 1024, then steps of 1024: the full-attention layers read at most ~1.25x the live keys.
    buckets = [b for b in (128, 256, 512, 1024) if b < max_seq_len]
    b = 2048
    while b < max_seq_len:
        buckets.append(b)
        b += 1024
    buckets.append(max_seq_len)
    return buckets


def _batch_buckets(max_batch: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < max_batch]
    return buckets + [max_batch]


class FastGenerator:
    """Generation over a static KV cache with graph-captured decode steps; see the module docstring."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 64,
        max_seq_len: int = 8192,
        use_cuda_graphs: bool = True,
        adapter=None,
        prefill_tokens: int = 8192,
        fused_kernels: bool | None = None,
        keep_mxfp4: bool = False,
    ):
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch must be >= 1 and max_seq_len >= 2, got {max_batch} and {max_seq_len}")
        if adapter is not None:
            model = self._attach_adapter(model, adapter)
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.prefill_tokens = prefill_tokens
        on_cuda = unwrap_peft(model).model.embed_tokens.weight.device.type == "cuda"
        # Triton-fused decode step (gen_kernels) on CUDA by default; the eager step elsewhere or when asked.
        self.fused_kernels = on_cuda if fused_kernels is None else fused_kernels
        # keep_mxfp4: MXFP4-resident experts stay MXFP4 and the fused step reads the bytes (13 instead of 39 GB at
        # 20b, what 120b needs on one GPU). Off by default: per step it measured slower than bf16 experts on an H100
        # (docs/fast-generation.md); the default decodes them once to a resident bf16 copy.
        with torch.no_grad():
            self.weights: ModelWeights = collect_weights(model, max_seq_len, keep_mxfp4=keep_mxfp4)
        self.device = self.weights.device
        self.use_grouped = grouped_mm_supported(self.weights.embed)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.cache = KVCache(self.weights, max_batch, max_seq_len)
        self._length_buckets = _length_buckets(max_seq_len)
        self._batch_buckets = _batch_buckets(max_batch)
        # Static decode inputs/outputs: graphs read and write these addresses.
        self._tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._logits = torch.zeros(max_batch, self.weights.lm_head.shape[0], dtype=torch.float32, device=self.device)
        pin = self.device.type == "cuda"
        # Two of each host buffer: step t+1 is launched before step t's tokens are read (see generate()).
        self._tokens_host = [torch.zeros(max_batch, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._positions_host = [torch.zeros(max_batch, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if pin else None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        self.fused_error: str | None = None  # why the fused step was switched off, if it was (kept across calls)
        self.stats = GenerationStats()

    @staticmethod
    def _attach_adapter(model, adapter):
        if isinstance(adapter, (str, Path)):
            from peft import PeftModel

            return PeftModel.from_pretrained(model, str(adapter))
        raise TypeError(f"adapter must be a path to a PEFT adapter folder, got {type(adapter).__name__}")

    # ------------------------------------------------------------------------------------------------------------------
    # Decode step (graph-captured on CUDA)
    # ------------------------------------------------------------------------------------------------------------------

    def _step_fn(self, batch: int):
        if self.fused_kernels and fused_decode_supported(self.weights, batch, self.use_grouped):
            return decode_step_fused
        return decode_step

    def reset_graphs(self) -> None:
        """Drop the captured graphs (e.g. after changing `fused_kernels`); the next steps capture afresh.

        A fresh memory pool too: once the last graph of a pool is destroyed PyTorch releases the pool, and capturing
        into its stale handle fails with `use_count > 0 INTERNAL ASSERT FAILED` (CUDACachingAllocator)."""
        self._graphs.clear()
        if self.use_cuda_graphs:
            self._graph_pool = torch.cuda.graph_pool_handle()

    def _fused_failed(self, err: Exception) -> None:
        # A Triton compile or launch failure: the eager step from now on (still graph-captured).
        warnings.warn(f"fused decode kernels failed, using the eager step: {err}", stacklevel=3)
        self.fused_kernels = False
        self.stats.fused_error = self.fused_error = f"{type(err).__name__}: {str(err)[:300]}"
        torch.cuda.synchronize(self.device)

    def _run_decode(self, batch: int, kv_len: int) -> Tensor:
        if not self.use_cuda_graphs:
            step_fn = self._step_fn(batch)
            try:
                self._logits[:batch] = step_fn(
                    self.weights, self.cache, self._tokens[:batch], self._positions[:batch], kv_len, self.use_grouped
                )
            except Exception as err:  # noqa: BLE001 - a kernel/compiler failure must not stop generation
                if step_fn is not decode_step_fused:
                    raise
                self._fused_failed(err)
                return self._run_decode(batch, kv_len)
            return self._logits[:batch]
        key = (batch, kv_len)
        graph = self._graphs.get(key)
        if graph is None:
            t0 = time.perf_counter()
            try:
                graph = self._capture(batch, kv_len)
            except Exception as err:  # noqa: BLE001 - a kernel/compiler failure must not stop generation
                if self._step_fn(batch) is decode_step_fused:
                    self._fused_failed(err)
                elif isinstance(err, RuntimeError):  # e.g. an op that syncs in this torch build
                    warnings.warn(f"CUDA graph capture failed, decoding without graphs: {err}", stacklevel=2)
                    self.use_cuda_graphs = False
                    torch.cuda.synchronize(self.device)
                else:
                    raise
                return self._run_decode(batch, kv_len)
            self._graphs[key] = graph
            self.stats.graphs_captured += 1
            self.stats.capture_s += time.perf_counter() - t0
        graph.replay()
        return self._logits[:batch]

    def _capture(self, batch: int, kv_len: int) -> torch.cuda.CUDAGraph:
        step_fn = self._step_fn(batch)

        def step():
            self._logits[:batch] = step_fn(
                self.weights, self.cache, self._tokens[:batch], self._positions[:batch], kv_len, self.use_grouped
            )

        # Warm up on a side stream (lazy cuBLAS/CUTLASS initialisation must not happen during capture). The warm-up
        # and capture write K/V for the current tokens at their positions, which the replay rewrites identically.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            step()
        return graph

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
            sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
            probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (renormalisation is implicit), one kernel
        # pass and no host sync, unlike torch.multinomial.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)

    # ------------------------------------------------------------------------------------------------------------------
    # The scheduler
    # ------------------------------------------------------------------------------------------------------------------

    def _bucket(self, buckets: list[int], need: int) -> int:
        return buckets[bisect.bisect_left(buckets, need)]

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids=(RETURN_ID, CALL_ID),
    ) -> list[list[int]]:
        """Completion ids for each prompt (stop token included when hit), in the prompts' order.

        temperature 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature) restricted to the
        smallest top-p nucleus. A seed makes sampling reproducible for the same prompts and settings.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        vocab = self.weights.embed.shape[0]
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens but max_seq_len is {self.max_seq_len}; "
                    "raise max_seq_len or shorten the prompt"
                )
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
        stops = set(stop_ids)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        self.stats = GenerationStats()
        start = time.perf_counter()
        results: list[list[int] | None] = [None] * len(prompts)
        queue = deque(range(len(prompts)))
        slots: list[_Sequence | None] = [None] * self.max_batch

        def finished(seq: _Sequence) -> bool:
            return (
                seq.completion[-1] in stops
                or len(seq.completion) >= max_new_tokens
                or seq.prompt_len + len(seq.completion) >= self.max_seq_len
            )

        def can_launch(seq: _Sequence) -> bool:
            # Step j produces completion token j + 1: only launch steps whose token can be kept.
            j = seq.launched
            return not seq.done and j + 1 < max_new_tokens and seq.prompt_len + j + 1 < self.max_seq_len

        def release(slot: int, seq: _Sequence) -> None:
            seq.done = True
            results[seq.index] = seq.completion
            if slots[slot] is seq:
                slots[slot] = None

        # Pipelined decode: step t+1 is launched (its input tokens are step t's samples, already on the device)
        # before the host reads step t's tokens, so host work hides behind GPU work. A sequence that stops at step
        # t costs one wasted token in step t+1, computed in its own cache rows and dropped.
        pending = None
        step_index = 0
        while True:
            free = [i for i, s in enumerate(slots) if s is None]
            while queue and free:
                batch_idx, batch_slots, budget = [], [], self.prefill_tokens
                while queue and free and (not batch_idx or len(prompts[queue[0]]) <= budget):
                    budget -= len(prompts[queue[0]])
                    batch_idx.append(queue.popleft())
                    batch_slots.append(free.pop(0))
                t0 = time.perf_counter()
                logits = prefill(
                    self.weights, self.cache, [prompts[i] for i in batch_idx], batch_slots, self.use_grouped
                )
                first_dev = self._sample(logits, temperature, top_p, generator)
                # Stream-ordered after any in-flight step, so that step's writes to a reused slot land first.
                self._tokens[torch.tensor(batch_slots, device=self.device)] = first_dev
                first = first_dev.tolist()
                self.stats.prefill_s += time.perf_counter() - t0
                if self.stats.first_token_s is None:
                    self.stats.first_token_s = time.perf_counter() - start
                for idx, slot, tok in zip(batch_idx, batch_slots, first):
                    seq = _Sequence(idx, len(prompts[idx]), [tok])
                    if finished(seq):
                        results[idx] = seq.completion
                        free.insert(0, slot)
                        free.sort()
                    else:
                        slots[slot] = seq
            t0 = time.perf_counter()
            launch = [i for i, s in enumerate(slots) if s is not None and can_launch(s)]
            launched = self._launch_step(launch, slots, step_index, temperature, top_p, generator) if launch else None
            step_index += 1
            if pending is not None:
                for slot, seq, tok in self._collect_step(pending):
                    if seq.done:
                        continue  # stopped at an earlier step: this token is the wasted one
                    seq.completion.append(tok)
                    self.stats.decode_tokens += 1
                    if finished(seq):
                        release(slot, seq)
            self.stats.decode_s += time.perf_counter() - t0
            pending = launched
            if pending is None and not queue and all(s is None for s in slots):
                break
        return [r if r is not None else [] for r in results]

    def _launch_step(self, live: list[int], slots, step_index: int, temperature, top_p, generator):
        """Enqueue one decode step for slots `live` (device-side input tokens); its sampled tokens land in
        self._tokens and, asynchronously, in a pinned host buffer. Returns what _collect_step needs."""
        batch = self._bucket(self._batch_buckets, live[-1] + 1)
        buf = step_index % 2
        positions = self._positions_host[buf]
        positions[:batch] = 0  # idle slots inside the batch compute garbage at position 0 of their own rows
        members = []
        for i in live:
            seq = slots[i]
            positions[i] = seq.prompt_len + seq.launched
            seq.launched += 1
            members.append((i, seq))
        kv_len = self._bucket(self._length_buckets, int(positions[:batch].max()) + 1)
        self._positions[:batch].copy_(positions[:batch], non_blocking=True)
        logits = self._run_decode(batch, kv_len)
        nxt = self._sample(logits, temperature, top_p, generator)
        self._tokens[:batch].copy_(nxt)
        host = self._tokens_host[buf]
        if self._events is not None:
            host[:batch].copy_(nxt, non_blocking=True)
            self._events[buf].record()
        else:
            host[:batch].copy_(nxt)
        self.stats.decode_steps += 1
        return buf, batch, members

    def _collect_step(self, launched):
        """Wait for a launched step's tokens: (slot, sequence, token) for each sequence it advanced."""
        buf, batch, members = launched
        if self._events is not None:
            self._events[buf].synchronize()
        tokens = self._tokens_host[buf][:batch].tolist()
        return [(slot, seq, tokens[slot]) for slot, seq in members]
