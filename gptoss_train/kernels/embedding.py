"""Frozen input embeddings kept in host memory (opt-in): 1.08 GiB of GPU memory back for 20b/120b LoRA.

gpt-oss's input table is 201,088 x 2880 bf16. Under LoRA it is frozen and read once per step, for the batch's rows
only (8192 rows = 45 MiB at 4 x 2048). Kept in pinned host memory, the lookup is an embedding kernel on the GPU that
reads those rows over the host link (a CUDA view of the pinned table, ``device_view_of_pinned``): no host
synchronisation. Where no such view can be made, the lookup runs on the CPU into a pinned buffer that goes to the
GPU as one asynchronous copy, after the token ids come to the host (one synchronisation per forward).

Opt-in (``enable_fast_training(..., offload_embeddings=True)``), because ``embed_tokens.weight`` becomes a zero-stride
placeholder on the GPU (so ``model.device`` and shapes stay right): code that reads that tensor directly, such as
the generation fast path (kernels/gen_model.py) or a full-model ``save_pretrained``, must run after
``restore_embeddings``. LoRA adapters save as usual (the table is not part of them).
"""

from __future__ import annotations

import functools

import torch


class _PinnedArray:
    """``__cuda_array_interface__`` of a pinned host tensor, so that torch.as_tensor makes a CUDA tensor over the same
    memory: with unified addressing, pinned host memory has the same address on the device, and kernels read it over
    the host link (zero-copy). Holds the host tensor, which the CUDA view keeps alive through this object."""

    def __init__(self, host: torch.Tensor):
        self.host = host.view(torch.int16)  # the interface has no bfloat16 type string; the bytes are the same
        self.__cuda_array_interface__ = {"shape": tuple(self.host.shape), "typestr": "<i2",
                                         # torch refuses the read-only flag; nothing writes through the view
                                         "data": (self.host.data_ptr(), False), "strides": None, "version": 3}


def device_view_of_pinned(host: torch.Tensor, device) -> torch.Tensor | None:
    """A tensor on CUDA ``device`` aliasing the pinned 2-byte host tensor ``host`` (None where that is not possible;
    never a copy: a view that would not share the host memory is refused)."""
    device = torch.device(device)
    if not (device.type == "cuda" and host.is_pinned() and host.element_size() == 2 and host.is_contiguous()):
        return None
    try:
        view = torch.as_tensor(_PinnedArray(host), device=device)
    except (RuntimeError, TypeError, ValueError):
        return None
    if view.data_ptr() != host.data_ptr():  # torch moved it (another device): that would be a 1 GiB copy on the GPU
        return None
    return view.view(host.dtype)


def _host_embedding_forward(module, input_ids: torch.Tensor) -> torch.Tensor:
    host = module._host_weight
    device_view = module.__dict__.get("_device_view")
    if input_ids.is_cuda and device_view is not None and device_view.device == input_ids.device:
        # Ids already on the GPU: the lookup reads the batch's rows from host memory itself; no synchronisation.
        return torch.nn.functional.embedding(input_ids, device_view)
    ids = input_ids.to("cpu").reshape(-1)
    rows = torch.empty((ids.numel(), host.shape[1]), dtype=host.dtype, pin_memory=host.is_pinned())
    torch.index_select(host, 0, ids, out=rows)
    return rows.view(*input_ids.shape, host.shape[1]).to(module.weight.device, non_blocking=True)


def offload_frozen_embeddings(model) -> int:
    """Move a frozen, untied input embedding table to pinned host memory; returns the bytes freed on the device
    (0 when the table trains, is tied to the LM head, or was moved already)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = base.get_input_embeddings()
    weight = embed.weight
    lm_head = base.get_output_embeddings()
    if (weight.requires_grad or getattr(embed, "_host_weight", None) is not None
            or (lm_head is not None and lm_head.weight.data_ptr() == weight.data_ptr())):
        return 0
    host = weight.detach().to("cpu")
    if weight.is_cuda:
        host = host.pin_memory()
    freed = weight.numel() * weight.element_size()
    embed._host_weight = host
    embed._device_view = device_view_of_pinned(host, weight.device) if weight.is_cuda else None
    embed.weight = torch.nn.Parameter(torch.zeros(1, dtype=weight.dtype, device=weight.device).expand(weight.shape),
                                      requires_grad=False)
    embed.forward = functools.partial(_host_embedding_forward, embed)
    return freed


def restore_embeddings(model) -> bool:
    """Undo ``offload_frozen_embeddings``: the table back on the model's device as a normal parameter."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = base.get_input_embeddings()
    embed.__dict__.pop("_device_view", None)
    host = embed.__dict__.pop("_host_weight", None)
    if host is None:
        return False
    embed.weight = torch.nn.Parameter(host.to(embed.weight.device), requires_grad=False)
    embed.__dict__.pop("forward", None)
    return True
