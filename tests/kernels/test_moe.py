"""Grouped MoE experts + PEFT LoRA (bf16/fp32 and MXFP4-resident) vs transformers' experts under PEFT."""

import copy

import pytest
import torch

from gptoss_train.kernels.moe import (_unwrap_experts, attach_mxfp4_experts, decode_mxfp4_experts,
                                      install_fast_experts, moe_experts_forward)

from conftest import add_lora, build_tiny_model, lora_grads, rel_err

mxfp4 = pytest.importorskip("gptoss_train.quant.mxfp4")


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def _compare_lora_training(reference, fast, ids):
    ref_loss = reference(input_ids=ids, labels=ids).loss
    fast_loss = fast(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    fast_loss.backward()
    assert rel_err(fast_loss, ref_loss) < 1e-5
    ref_grads = lora_grads(reference)
    fast_grads = lora_grads(fast)
    assert any("experts" in name for name in fast_grads)
    for name, grad in fast_grads.items():
        assert grad.abs().sum() > 0, f"{name} received no gradient"
        assert rel_err(grad, ref_grads[name]) < 1e-2, name


def test_grouped_experts_with_lora_match_peft():
    model = build_tiny_model()
    reference = add_lora(copy.deepcopy(model))
    fast = add_lora(copy.deepcopy(model))
    assert install_fast_experts(fast) == 2
    _compare_lora_training(reference, fast, _ids())


def test_every_expert_adapter_is_read():
    """The per-expert LoRA factor views pick PEFT's layout (A rows expert-major, B columns rank-major)."""
    fast = add_lora(build_tiny_model(), rank=3)
    base, adapters = _unwrap_experts(fast.get_base_model().model.layers[0].mlp.experts)
    wrapper = fast.get_base_model().model.layers[0].mlp.experts  # outer wrapper: down_proj
    lora_a, lora_b, scaling = adapters["down_proj"][0]
    delta = torch.einsum("eir,ero->eio", lora_a, lora_b) * scaling
    assert rel_err(delta, wrapper.get_delta_weight("default")) < 1e-6
    assert lora_a.shape == (4, base.intermediate_size, 3) and lora_b.shape == (4, 3, base.hidden_size)


def test_routed_output_matches_transformers_experts():
    model = build_tiny_model()
    mlp = model.model.layers[0].mlp
    hidden = torch.randn(10, 64, generator=torch.Generator().manual_seed(4))
    _, scores, indices = mlp.router(hidden)
    with torch.no_grad():
        expected = mlp.experts(hidden, indices, scores)
        got = moe_experts_forward(hidden, indices, scores, mlp.experts)
    assert rel_err(got, expected) < 1e-5


def _mxfp4_pair(model):
    """(reference with dense experts = decode(MXFP4), fast model holding only the MXFP4 bytes)."""
    quantized = copy.deepcopy(model)
    for layer in quantized.model.layers:
        experts = layer.mlp.experts
        gate_up = mxfp4.encode(experts.gate_up_proj.detach().transpose(-1, -2).contiguous())
        down = mxfp4.encode(experts.down_proj.detach().transpose(-1, -2).contiguous())
        with torch.no_grad():
            experts.gate_up_proj.copy_(mxfp4.decode(*gate_up, dtype=torch.float32, transpose=True))
            experts.down_proj.copy_(mxfp4.decode(*down, dtype=torch.float32, transpose=True))
        experts._mxfp4_bytes = (*gate_up, *down)
    reference = copy.deepcopy(quantized)
    fast = quantized
    for layer in fast.model.layers:
        attach_mxfp4_experts(layer.mlp.experts, *layer.mlp.experts._mxfp4_bytes)
        del layer.mlp.experts._mxfp4_bytes
    return reference, fast


def test_mxfp4_resident_experts_match_dense_decode():
    reference, fast = _mxfp4_pair(build_tiny_model())
    experts = fast.model.layers[0].mlp.experts
    # placeholders cost 2 bytes each: no dense copy of the experts stays resident
    assert experts.gate_up_proj.untyped_storage().nbytes() <= 4
    assert experts.gate_up_proj.shape == reference.model.layers[0].mlp.experts.gate_up_proj.shape
    reference, fast = add_lora(reference), add_lora(fast)
    install_fast_experts(fast)
    _compare_lora_training(reference, fast, _ids(5))


def test_hot_path_decode_equals_codec():
    x = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(6)) * 3
    blocks, scales = mxfp4.encode(x)
    assert torch.equal(decode_mxfp4_experts(blocks, scales, torch.float32), mxfp4.decode(blocks, scales, dtype=torch.float32))


def test_fast_experts_over_model_load_mxfp4(tiny_checkpoint):
    """The loader's MXFP4-resident experts (model.load, experts="mxfp4") feed the grouped path: same loss and LoRA
    gradients as the loader's dense-bf16 experts under PEFT."""
    from gptoss_train.model.load import load_model

    reference = add_lora(load_model(tiny_checkpoint, experts="bf16", dtype=torch.float32))
    fast = add_lora(load_model(tiny_checkpoint, experts="mxfp4", dtype=torch.float32))
    assert install_fast_experts(fast) == fast.get_base_model().config.num_hidden_layers
    _compare_lora_training(reference, fast, _ids(8, shape=(1, 10)))


def test_mxfp4_decode_in_row_pieces_matches_dense_decode(monkeypatch):
    """A small piece budget splits every stack into row ranges (forward concatenates, backward sums): same result."""
    from gptoss_train.kernels import moe

    monkeypatch.setattr(moe, "DECODE_PIECE_BYTES", 1)  # the minimum: 8 rows a piece
    reference, fast = _mxfp4_pair(build_tiny_model())
    blocks = fast.model.layers[0].mlp.experts.gate_up_proj_blocks
    pieces = moe._row_pieces(blocks, torch.float32)
    assert len(pieces) == blocks.shape[1] // 8 and pieces[-1][1] == blocks.shape[1]
    assert torch.equal(decode_mxfp4_experts(blocks, fast.model.layers[0].mlp.experts.gate_up_proj_scales,
                                            torch.float32, (8, 24)),
                       decode_mxfp4_experts(blocks, fast.model.layers[0].mlp.experts.gate_up_proj_scales,
                                            torch.float32)[:, 8:24])
    reference, fast = add_lora(reference), add_lora(fast)
    install_fast_experts(fast)
    _compare_lora_training(reference, fast, _ids(9))


def _expert_grads(experts, hidden, indices, scores, grad_out, gradient_only):
    hidden = hidden.clone().requires_grad_()
    scores = scores.detach().clone().requires_grad_()
    out = moe_experts_forward(hidden, indices, scores, experts, gradient_only=gradient_only)
    trainable = [p for p in experts.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [hidden, scores, *trainable], grad_out)
    return out, grads


@pytest.mark.parametrize("storage", ["dense", "mxfp4"])
@pytest.mark.parametrize("adapted", ["all", "gate_up only", "none"])
def test_gradient_only_experts_give_the_same_gradients(storage, adapted, monkeypatch):
    """The recompute pass's experts (gradient_only=True: the down projection's output is never computed) give the
    input, routing-weight and LoRA gradients of the full path, for dense and MXFP4 experts, with and without LoRA
    on the down projection; and no down-projection product or decode runs in their forward."""
    from peft import LoraConfig, get_peft_model

    from gptoss_train.kernels import moe

    model = build_tiny_model()
    if storage == "mxfp4":
        _, model = _mxfp4_pair(model)
    if adapted != "none":
        targets = ["mlp.experts.gate_up_proj"] + (["mlp.experts.down_proj"] if adapted == "all" else [])
        torch.manual_seed(3)
        model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"], target_parameters=targets,
                                                 init_lora_weights=False))
        layers = model.get_base_model().model.layers
    else:  # frozen experts, as under LoRA elsewhere (a trainable base weight keeps the full path)
        model.requires_grad_(False)
        layers = model.model.layers
    mlp = layers[1].mlp
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, 64, generator=generator)
    _, scores, indices = mlp.router(hidden)
    grad_out = torch.randn(9, 64, generator=generator)
    full_out, full = _expert_grads(mlp.experts, hidden, indices, scores, grad_out, gradient_only=False)
    projections = []
    original = moe._projection
    monkeypatch.setattr(moe, "_projection", lambda x, base, name, *a, **k: projections.append(name) or original(x, base, name, *a, **k))
    _, only = _expert_grads(mlp.experts, hidden, indices, scores, grad_out, gradient_only=True)
    assert projections == ["gate_up_proj"]
    assert len(full) == len(only) >= 2 + (4 if adapted == "all" else 2 if adapted == "gate_up only" else 0)
    for got, expected in zip(only, full):
        assert expected.abs().sum() > 0
        assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("keep", [True, False])
def test_recompute_pass_decodes_gate_up_once(keep, monkeypatch):
    """In a recompute pass (gradient_only) the MXFP4 gate_up stack decoded for the product serves backward's dX:
    one gate_up decode instead of two, and the same gradients; a stack over KEEP_DECODED_MAX_BYTES keeps pieces."""
    from peft import LoraConfig, get_peft_model

    from gptoss_train.kernels import moe

    _, model = _mxfp4_pair(build_tiny_model())
    torch.manual_seed(3)
    model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"],
                                             target_parameters=["mlp.experts.gate_up_proj"], init_lora_weights=False))
    mlp = model.get_base_model().model.layers[0].mlp
    generator = torch.Generator().manual_seed(21)
    hidden = torch.randn(11, 64, generator=generator)
    _, scores, indices = mlp.router(hidden)
    grad_out = torch.randn(11, 64, generator=generator)
    _, full = _expert_grads(mlp.experts, hidden, indices, scores, grad_out, gradient_only=False)
    if not keep:
        monkeypatch.setattr(moe, "KEEP_DECODED_MAX_BYTES", 0)
    decoded = []
    original = moe.decode_mxfp4_experts
    gate_up_rows = mlp.experts.base_layer.gate_up_proj_blocks.shape[1]
    monkeypatch.setattr(moe, "decode_mxfp4_experts", lambda blocks, *a, **k: decoded.append(
        "gate_up" if blocks.shape[1] == gate_up_rows else "down") or original(blocks, *a, **k))
    _, only = _expert_grads(mlp.experts, hidden, indices, scores, grad_out, gradient_only=True)
    assert decoded == (["gate_up", "down"] if keep else ["gate_up", "down", "gate_up"])
    for got, expected in zip(only, full):
        assert expected.abs().sum() > 0
        assert rel_err(got, expected) < 1e-5


def test_gradient_only_keeps_the_full_path_for_a_trainable_down_projection(monkeypatch):
    """Full fine-tuning trains the experts' weights: their gradient needs the real path, so nothing is skipped."""
    from gptoss_train.kernels import moe

    mlp = build_tiny_model().model.layers[0].mlp
    hidden = torch.randn(7, 64, generator=torch.Generator().manual_seed(12))
    _, scores, indices = mlp.router(hidden)
    grad_out = torch.randn(7, 64, generator=torch.Generator().manual_seed(13))
    _, full = _expert_grads(mlp.experts, hidden, indices, scores, grad_out, gradient_only=False)
    projections = []
    original = moe._projection
    monkeypatch.setattr(moe, "_projection", lambda x, base, name, *a, **k: projections.append(name) or original(x, base, name, *a, **k))
    _, only = _expert_grads(mlp.experts, hidden, indices, scores, grad_out, gradient_only=True)
    assert projections == ["gate_up_proj", "down_proj"]
    for got, expected in zip(only, full):
        assert rel_err(got, expected) < 1e-6


def test_lora_rank_is_padded_to_the_grouped_gemm_alignment():
    """grouped_mm refuses strides that are not 16-byte multiples (rank 3 in fp32, rank 4 in bf16): the rank is
    zero-padded, the product is unchanged and the gradients of the real rank come back."""
    from gptoss_train.kernels.moe import _lora_operands

    generator = torch.Generator().manual_seed(14)
    lora_a = torch.randn(2, 16, 3, generator=generator, requires_grad=True)
    lora_b = torch.randn(2, 3, 8, generator=generator, requires_grad=True)
    a, b = _lora_operands(lora_a, lora_b, torch.float32)
    assert a.shape == (2, 16, 4) and b.shape == (2, 4, 8) and a.stride(1) * a.element_size() % 16 == 0
    assert torch.equal(a @ b, lora_a @ lora_b)
    (a @ b).sum().backward()
    assert lora_a.grad.shape == lora_a.shape and lora_b.grad.shape == lora_b.shape
    a16, _ = _lora_operands(lora_a.detach()[..., :2], lora_b.detach()[:, :2], torch.bfloat16)
    assert a16.shape[-1] == 8


_TRITON_DECODE_CHECK = """
import torch
from gptoss_train.kernels import mxfp4_decode
from gptoss_train.kernels.moe import _decode_mxfp4_eager
blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8)
scales = torch.randint(110, 140, (3, 40, 4), dtype=torch.uint8)
table = _decode_mxfp4_eager(blocks, scales, torch.float32)
assert torch.equal(mxfp4_decode._launch_decode(blocks, scales, torch.float32, 0, 40, lambda k: k), table)
assert torch.equal(mxfp4_decode._launch_decode(blocks, scales, torch.float32, 8, 16, lambda k: k), table[:, 8:24])
"""


def test_triton_decode_kernel_under_the_interpreter():
    """The CUDA decode kernel (whole stacks and row pieces) is bit-identical to the table decode; Triton's CPU
    interpreter runs it here (it must be on before Triton is imported, hence the subprocess)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _TRITON_DECODE_CHECK], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_route_order_is_the_stable_sort_by_expert():
    """The counting sort of the routed pairs equals a stable argsort, with empty experts and the last one used."""
    from gptoss_train.kernels.moe import route_order

    generator = torch.Generator().manual_seed(17)
    for experts, pairs in ((4, 1), (32, 300), (128, 1000)):
        flat = torch.randint(0, experts, (pairs,), generator=generator)
        flat[flat == 1] = 0  # expert 1 empty
        flat[-1] = experts - 1
        order, inverse, offs = route_order(flat, experts)
        expected = torch.argsort(flat, stable=True)
        assert torch.equal(order, expected)
        assert torch.equal(order[inverse], torch.arange(pairs))
        assert torch.equal(offs, torch.cumsum(torch.bincount(flat, minlength=experts), 0).to(torch.int32))
        assert offs.dtype == torch.int32


def test_no_grad_forward_combines_in_one_gather_reduce():
    """With autograd off (the forward of a recomputed layer) the un-permute, bias, routing weight and sum over K are
    one expression over the expert-sorted products: same output as the differentiable path."""
    mlp = build_tiny_model().model.layers[1].mlp
    hidden = torch.randn(13, 64, generator=torch.Generator().manual_seed(31))
    _, scores, indices = mlp.router(hidden)
    with_grad = moe_experts_forward(hidden, indices, scores, mlp.experts)
    with torch.no_grad():
        without = moe_experts_forward(hidden, indices, scores, mlp.experts)
    assert with_grad.requires_grad and not without.requires_grad
    assert rel_err(without, with_grad) < 1e-6
