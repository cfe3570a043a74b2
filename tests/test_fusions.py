"""CUDA fusions: chosen by device detection, all off on CPU, and the CUDA set is one megatron accepts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from megadiff.config import ModelConfig
from megadiff.model.build import describe_fusions, fusion_settings, gelu_tanh, transformer_config
from megadiff.model.presets import resolve_shape


def test_cpu_gets_no_fusions():
    f = fusion_settings("cpu")
    assert set(f) == {"bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "persist_layer_norm",
                      "gradient_accumulation_fusion", "masked_softmax_fusion"}
    assert not any(f.values())
    assert describe_fusions(f) == "fusions: none (no CUDA kernels on this device)"


def test_cuda_fusion_set_is_accepted_by_megatron_for_both_archs():
    # what fusion_settings("cuda") picks on a GPU without TE/apex: megatron's own jit kernels
    cuda = {"bias_activation_fusion": True, "bias_dropout_fusion": True, "apply_rope_fusion": False,
            "persist_layer_norm": False, "gradient_accumulation_fusion": False, "masked_softmax_fusion": False}
    for arch in ("llama", "gpt2"):
        mc = OmegaConf.structured(ModelConfig(arch=arch, num_layers=2, hidden_size=64, num_attention_heads=4))
        tc = transformer_config(resolve_shape(mc), mc, fusions=cuda)
        assert tc.bias_activation_fusion and tc.bias_dropout_fusion
        assert tc.activation_func is (F.silu if arch == "llama" else F.gelu)
    assert describe_fusions(cuda) == "fusions: bias_activation, bias_dropout"


def test_megatron_fused_bias_gelu_is_the_tanh_gelu_gpt2_uses_unfused():
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

    g = torch.Generator().manual_seed(0)
    x, b = torch.randn(64, 32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bias_gelu_impl(x, b), gelu_tanh(x + b), rtol=1e-6, atol=1e-6)
