"""The compiled RMSNorm's math equals transformers' GptOssRMSNorm (the compiled wrapper itself runs on CUDA only)."""

import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

from gptoss_train.kernels.norm import install_compiled_norms, rms_norm


def test_rms_norm_matches_transformers():
    norm = GptOssRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


def test_cpu_norms_are_left_alone():
    model = torch.nn.Sequential(GptOssRMSNorm(8))
    assert install_compiled_norms(model) == 0
