"""Causal-LM loss over gpt-oss's 201,088-token vocabulary without materialising the logits.

transformers computes ``lm_head(hidden)`` for every position (bf16, 3.3 GB at 8K tokens), upcasts it to fp32 (6.6 GB)
and keeps both for backward. Here the tokens are processed in chunks: each chunk's logits are computed, turned into
its loss and its gradient (softmax - one-hot) at once, multiplied back into dHidden (and dW if the head trains), and
freed. Forward therefore already holds the gradients (as Liger's fused linear cross-entropy does), so backward is a
scale by the incoming gradient: one vocabulary GEMM fewer than recomputing, and memory bounded by one chunk.

Liger's kernel (PyPI ``liger-kernel``) does the same in Triton; plain torch chunks reach the same memory bound with
cuBLAS GEMMs and need no extra dependency on the GPU image.
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -100


def _chunk_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """(summed loss over the valid rows, fp32 logits, lse, valid mask, target with ignored rows set to 0) of a chunk."""
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    loss_sum = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    return loss_sum, logits, lse, valid, safe_target


def _chunk_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """(summed loss, d(loss)/d(logits) in ``logits.dtype``) of one chunk, for the valid rows; ignored rows get 0.

    Compiled on CUDA into a reduction and one elementwise pass: the fp32 logits, exp and one-hot never exist as
    whole buffers (eagerly they were ~8 passes over a 0.8 GB fp32 chunk, and 0.8 GB of transient memory)."""
    out_dtype = logits.dtype
    loss_sum, logits, lse, valid, safe_target = _chunk_loss(logits, target, ignore_index)
    columns = torch.arange(logits.shape[1], device=logits.device)
    probs = torch.exp(logits - lse.unsqueeze(1))
    grad = torch.where(columns.unsqueeze(0) == safe_target.unsqueeze(1), probs - 1, probs)
    grad = torch.where(valid.unsqueeze(1), grad, torch.zeros_like(grad))
    return loss_sum, grad.to(out_dtype)


@functools.cache
def _compiled_chunk_loss_and_grad():
    return torch.compile(_chunk_loss_and_grad, dynamic=False)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, denominator, chunk_size: int, ignore_index: int, grad_enabled: bool):
        grad_hidden = torch.empty_like(hidden) if grad_enabled and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if grad_enabled and ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            target = labels[start:start + chunk_size]
            logits = h @ weight.t()
            if grad_hidden is None and grad_weight is None:
                total = total + _chunk_loss(logits, target, ignore_index)[0]
                continue
            # d(loss)/d(logits) = softmax - onehot on valid rows, 0 on ignored ones; compiled on CUDA (one pass)
            chunk_fn = _compiled_chunk_loss_and_grad() if hidden.is_cuda else _chunk_loss_and_grad
            loss_sum, grad_logits = chunk_fn(logits, target, ignore_index)
            total = total + loss_sum
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.add_(grad_logits.t().float() @ h.float())
        loss = total / denominator
        ctx.save_for_backward(grad_hidden, grad_weight, denominator)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, denominator = ctx.saved_tensors
        scale = grad_loss / denominator
        d_hidden = None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype)
        d_weight = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                 num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                                 chunk_size: int = 1024) -> torch.Tensor:
    """Mean (or sum / num_items_in_batch) cross-entropy of ``hidden @ weight.T`` against ``labels``.

    hidden [N, H], weight [V, H], labels [N] (already shifted). Same value as transformers' ForCausalLMLoss."""
    labels = labels.to(hidden.device)
    if num_items_in_batch is None:
        denominator = (labels != ignore_index).sum().clamp(min=1).float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, denominator, chunk_size, ignore_index,
                                            torch.is_grad_enabled())


def causal_lm_chunked_loss(hidden_states, lm_head_weight, labels, *, num_items_in_batch=None, shift_labels=None,
                           ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024):
    """Shift like ForCausalLMLoss (token t predicts t+1; the last position has no target) and apply the chunked loss."""
    if shift_labels is None:
        padded = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    return chunked_linear_cross_entropy(hidden, lm_head_weight, shift_labels.reshape(-1),
                                        num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                                        chunk_size=chunk_size)


def _forward_with_chunked_loss(model, original_forward, chunk_size, input_ids=None, attention_mask=None,
                               position_ids=None, past_key_values=None, inputs_embeds=None, labels=None,
                               use_cache=None, output_router_logits=None, logits_to_keep=0, **kwargs):
    # Without labels (generation / eval) the model's own forward, logits included. With TRL's fused LM head
    # (SFTTrainer passes fused_lm_head=True) TRL already scores in tiles without full logits: let it.
    if labels is None or kwargs.get("fused_lm_head"):
        if labels is not None:
            kwargs["labels"] = labels
        return original_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                output_router_logits=output_router_logits, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    output_router_logits = (output_router_logits if output_router_logits is not None
                            else getattr(model.config, "output_router_logits", False))
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          output_router_logits=output_router_logits, **kwargs)
    loss = causal_lm_chunked_loss(outputs.last_hidden_state, model.lm_head.weight, labels,
                                  num_items_in_batch=num_items_in_batch, shift_labels=shift_labels,
                                  chunk_size=chunk_size)
    aux_loss = None
    if output_router_logits:
        from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func
        aux_loss = load_balancing_loss_func(outputs.router_logits, model.num_experts, model.num_experts_per_tok,
                                            attention_mask)
        loss = loss + model.router_aux_loss_coef * aux_loss.to(loss.device)
    # logits=None: they were never materialised; callers that need them run without labels.
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=None,
                                     past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions, router_logits=outputs.router_logits)


def install_chunked_loss(model, chunk_size: int = 1024) -> None:
    """Make ``model(…, labels=…)`` of a GptOssForCausalLM (PEFT-wrapped or not) use the chunked loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_chunked_loss_original_forward", None) is None:
        base._chunked_loss_original_forward = base.forward
    base.forward = functools.partial(_forward_with_chunked_loss, base, base._chunked_loss_original_forward, chunk_size)
