"""The compiled decoder layer (kernels/layer.py): traced whole (no graph breaks), and numerically the eager path.

The CUDA path compiles with inductor; here the "aot_eager" backend runs the same dynamo + AOTAutograd tracing
(autograd Functions, PEFT's LoRA modules, the opaque MXFP4 / grouped-GEMM ops, checkpointing around the region)
without code generation, so it checks in seconds what would break the GPU compile.
"""

import copy

import pytest
import torch

from gptoss_train.kernels import compile_failure, enable_fast_training

from conftest import add_lora, assert_same_lora_grads, assert_same_training, build_tiny_model, lora_grads, rel_err


def _train_both(recompute: str, backend: str, steps: int = 2, keep_mid: bool = False):
    from torch._dynamo.utils import counters

    from gptoss_train.kernels import install_layer_inputs_in_host
    from gptoss_train.kernels.layer import keeps_mid

    torch._dynamo.reset()
    counters.clear()
    model = build_tiny_model()
    reference, fast = add_lora(copy.deepcopy(model)), add_lora(copy.deepcopy(model))
    reference.train()
    fast.train()
    description = enable_fast_training(fast, recompute=recompute, force=True, compile_layers=True,
                                       compile_backend=backend)
    assert f"layers=compiled ({backend}) x2" in description
    if keep_mid:  # on CPU the inputs stay on the device, but the recompute starts from the kept mid all the same
        assert install_layer_inputs_in_host(fast)
    assert all(keeps_mid(layer) == keep_mid for layer in fast.get_base_model().model.layers)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(7))
    for _ in range(steps):  # the second step reuses the compiled graphs (and a recompute reruns them)
        reference.zero_grad(set_to_none=True)
        fast.zero_grad(set_to_none=True)
        ref_loss, fast_loss = reference(input_ids=ids, labels=ids).loss, fast(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        fast_loss.backward()
    assert compile_failure() is None
    assert not counters["graph_break"], dict(counters["graph_break"])
    # one graph per layer kind (sliding window / full), shared by every layer of that kind; with our recompute two
    # per kind: the forward (autograd off) and the recompute body
    assert counters["stats"]["unique_graphs"] == (4 if recompute == "layer" else 2)
    assert rel_err(fast_loss, ref_loss) < 1e-5
    ref_grads = lora_grads(reference)
    for name, grad in lora_grads(fast).items():
        assert rel_err(grad, ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("recompute", ["layer", "none"])
def test_compiled_layers_match_reference(recompute):
    _train_both(recompute, "aot_eager")


def test_recompute_from_the_kept_mid_matches_reference():
    """With the layer inputs kept (in host memory on CUDA), the forward keeps the hidden state after attention too
    and the recompute starts from it: the output projection runs for its gradients only. Same loss and gradients,
    through dynamo + AOTAutograd."""
    _train_both("layer", "aot_eager", keep_mid=True)


def test_attention_before_output_projection_is_transformers_attention():
    """Our restatement of GptOssAttention.forward up to o_proj (kernels/layer.py), through o_proj, is the installed
    transformers' forward, for the sliding and the full layer."""
    from gptoss_train.kernels.layer import attention_before_output_projection

    model = build_tiny_model()
    hidden = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(7)[None].expand(2, -1)
    embeddings = model.model.rotary_emb(hidden, positions)
    for layer in model.model.layers:
        expected, _ = layer.self_attn(hidden, embeddings, None)
        got = layer.self_attn.o_proj(attention_before_output_projection(layer.self_attn, hidden, embeddings, None))
        assert torch.equal(got, expected)


def _count_projections(monkeypatch):
    from gptoss_train.kernels import moe

    names = []
    original = moe._projection
    monkeypatch.setattr(moe, "_projection", lambda x, base, name, *a, **k: names.append(name) or original(x, base, name, *a, **k))
    return names


def test_own_recompute_skips_the_down_projection_and_matches_reference(monkeypatch):
    """recompute="layer" over our layer bodies is RecomputedLayer: transformers' checkpointing stays off, backward
    reruns each layer without its down projection, and loss and every LoRA gradient equal the reference's."""
    from gptoss_train.kernels import install_recompute
    from gptoss_train.kernels.layer import install_compiled_layers

    model = build_tiny_model()
    reference, fast = add_lora(copy.deepcopy(model)), add_lora(copy.deepcopy(model))
    reference.train()
    fast.train()
    enable_fast_training(fast, force=True, compile_layers=False)
    install_compiled_layers(fast, backend=None)  # our bodies, eagerly (the compiled ones: test above)
    install_recompute(fast, "layer")
    base = fast.get_base_model()
    assert not base.is_gradient_checkpointing
    assert all(layer._own_recompute for layer in base.model.layers)
    names = _count_projections(monkeypatch)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(8))
    fast_loss = fast(input_ids=ids, labels=ids).loss
    assert names == ["gate_up_proj", "down_proj"] * 2  # forward
    fast_loss.backward()
    assert names[4:] == ["gate_up_proj", "gate_up_proj"]  # recompute: no down projection
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    assert rel_err(fast_loss, ref_loss) < 1e-5
    assert_same_lora_grads(reference, fast, 1e-4, nonzero=True)


def test_layers_with_dropout_are_checkpointed_instead(monkeypatch):
    """Dropout would have to replay its RNG in our recompute: such layers run under torch.utils.checkpoint."""
    from peft import LoraConfig, get_peft_model

    from gptoss_train.kernels import install_recompute
    from gptoss_train.kernels.layer import install_compiled_layers, own_recompute_ok

    fast = get_peft_model(build_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
    fast.train()
    enable_fast_training(fast, force=True, compile_layers=False)
    install_compiled_layers(fast, backend=None)
    install_recompute(fast, "layer")
    layers = fast.get_base_model().model.layers
    assert not any(own_recompute_ok(layer) for layer in layers)
    names = _count_projections(monkeypatch)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(9))
    fast(input_ids=ids, labels=ids).loss.backward()
    assert names == ["gate_up_proj", "down_proj"] * 4  # forward, then the checkpoint's full recompute
    assert all(p.grad is not None for p in fast.parameters() if p.requires_grad)


def test_per_module_recompute_keeps_layers_eager():
    model = add_lora(build_tiny_model())
    model.train()
    enable_fast_training(model, recompute="attention", force=True, compile_layers=True, compile_backend="aot_eager")
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(2))
    from torch._dynamo.utils import counters

    counters.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 0


def test_compiled_layers_need_the_fast_attention_and_experts():
    with pytest.raises(ValueError, match="compile_layers"):
        enable_fast_training(build_tiny_model(), experts=False, compile_layers=True, force=True)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """A compiler that cannot run (here: an unknown backend) must not stop training: eager layers, reason recorded."""
    from gptoss_train.kernels import layer

    monkeypatch.setattr(layer, "_compile_failed", {})
    model = build_tiny_model()
    reference, fast = add_lora(copy.deepcopy(model)), add_lora(copy.deepcopy(model))
    enable_fast_training(fast, force=True, compile_layers=True, compile_backend="no_such_backend")
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="compiled decoder layer failed"):
        fast_loss = fast(input_ids=ids, labels=ids).loss
    assert "float32" in compile_failure()
    assert rel_err(fast_loss, reference(input_ids=ids, labels=ids).loss) < 1e-5


def test_flex_branch_of_the_compiled_body_traces_whole():
    """The CUDA branch (FlexAttention given a prebuilt BlockMask, lse, sink fold) traced in one graph and equal to the
    dense reference. CPU FlexAttention has no backward, so this checks forward only; gpu_check_train.py does both."""
    from torch._dynamo.utils import counters

    from gptoss_train.kernels.attention import layer_block_mask
    from gptoss_train.kernels.layer import decoder_layer_body

    torch._dynamo.reset()
    model = add_lora(build_tiny_model())
    enable_fast_training(model, force=True, compile_layers=False)
    base = model.get_base_model().model
    hidden = torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(5))
    positions = torch.cat([torch.arange(80), torch.arange(48)])[None]  # two packed documents
    with torch.no_grad():
        embeddings = base.rotary_emb(hidden, positions)
        compiled = torch.compile(decoder_layer_body, backend="aot_eager", dynamic=False)
        for layer in base.layers:  # sliding window, then full
            expected = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
            block_mask = layer_block_mask(None, positions, layer.self_attn.sliding_window, 2, 128, "cpu")
            counters.clear()
            got = compiled(layer, hidden, embeddings, None, None, block_mask)
            assert not counters["graph_break"], dict(counters["graph_break"])
            assert rel_err(got, expected) < 1e-5


def test_layers_know_whether_the_caller_gave_positions():
    """transformers fills in 0..L-1 when a forward gets no position_ids: the layers then build their mask without
    positions (one document per row, the same mask every step); given positions are used."""
    from gptoss_train.kernels.layer import install_compiled_layers, remove_compiled_layers

    model = build_tiny_model()
    enable_fast_training(model, force=True, compile_layers=False)
    install_compiled_layers(model, backend=None)
    caller = model.model.layers[0]._caller_positions
    assert all(layer._caller_positions is caller for layer in model.model.layers)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=ids)
        assert caller.given is False
        model(input_ids=ids, position_ids=torch.arange(8)[None])
        assert caller.given is True
    install_compiled_layers(model, backend=None)  # a second install keeps one hook
    assert len(model.model._forward_pre_hooks) == 1
    remove_compiled_layers(model)
    assert not model.model._forward_pre_hooks and "_caller_positions" not in model.model.layers[0].__dict__


def test_grouped_gemm_op_fixes_permuted_operands():
    """PEFT's lora_B read as [E, r, out] is a permuted view. Eagerly a .contiguous() at the call site fixed it, but
    inductor dropped that copy on the H100 ("Invalid strides/sizes ... [1, 32, 256]"); the opaque grouped-GEMM op
    now fixes operand layouts itself, whatever it is handed. (Inductor itself on this: the bf16 CPU check in
    docs/fast-training.md, too slow for the suite.)"""
    from gptoss_train.kernels.moe import _grouped_mm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 8, generator=gen)
    weight_b = torch.randn(16, 8 * 3, generator=gen)  # PEFT lora_B [out, r*E], r=8, E=3
    permuted = weight_b.view(16, 8, 3).permute(2, 1, 0)  # [E, r, out], strides (1, 3, 24): neither row- nor col-major
    offs = torch.tensor([4, 9, 12], dtype=torch.int32)
    expected = torch.cat([x[0:4] @ permuted[0], x[4:9] @ permuted[1], x[9:12] @ permuted[2]])
    assert rel_err(_grouped_mm(x, permuted, offs), expected) < 1e-6


def test_layer_inputs_in_host_need_our_recompute(monkeypatch):
    """install_layer_inputs_in_host applies only where our recompute saves the layer inputs; on CPU the inputs stay
    where they are (pinned host memory is a CUDA device's staging area) and training is unchanged."""
    from gptoss_train.kernels import install_layer_inputs_in_host, install_recompute
    from gptoss_train.kernels.layer import install_compiled_layers

    model = build_tiny_model()
    reference, fast = add_lora(copy.deepcopy(model)), add_lora(copy.deepcopy(model))
    enable_fast_training(fast, force=True, compile_layers=False, recompute="layer")
    assert not install_layer_inputs_in_host(fast)  # transformers' checkpointing: nothing to offload
    install_compiled_layers(fast, backend=None)
    install_recompute(fast, "layer")
    assert install_layer_inputs_in_host(fast)
    layers = fast.get_base_model().model.layers
    assert all(layer._host_inputs is layers[0]._host_inputs for layer in layers)
    fast.train()
    reference.train()
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(10))
    from gptoss_train.kernels import lora

    stubs = []  # the recompute starts from the kept mid: o_proj runs for its gradients only, once a layer
    original = lora._LinearForGradient.forward
    monkeypatch.setattr(lora._LinearForGradient, "forward", staticmethod(lambda *a: stubs.append(1) or original(*a)))
    assert_same_training(reference, fast, ids, grad_tol=1e-4, loss_tol=None)
    assert len(stubs) == len(layers)
