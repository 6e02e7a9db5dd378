"""Merging a LoRA adapter (attention + every expert) gives the logits of the unmerged adapter."""

from __future__ import annotations

import copy

import torch

from gptoss_train.model.load import load_model
from gptoss_train.model.lora import lora_config
from gptoss_train.model.merge import merge_adapter


def test_merged_and_unmerged_logits_agree(tmp_path, tiny_checkpoint, input_ids):
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(tiny_checkpoint, experts="mxfp4"), copy.deepcopy(lora_config(r=4, init_lora_weights=False)))
    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids).logits
        base = peft_model.get_base_model()
    peft_model.save_pretrained(tmp_path / "adapter")
    for source in (tiny_checkpoint, load_model(tiny_checkpoint, experts="mxfp4")):
        merged = merge_adapter(source, tmp_path / "adapter")
        assert not hasattr(merged, "peft_config")
        assert type(merged.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
        with torch.no_grad():
            logits = merged(input_ids).logits
        torch.testing.assert_close(logits, unmerged, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = load_model(tiny_checkpoint)(input_ids).logits
    assert (plain - unmerged).abs().max() > 1e-3  # the adapter does change the model
    assert merged.gptoss_source["adapter"] == str(tmp_path / "adapter")
