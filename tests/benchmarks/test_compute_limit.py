"""benchmarks/compute_limit.py on the tiny preset, CPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.compute_limit import build_segmenter, encoder_flops, main, matmul_rate


def _analytic_encoder_flops(config) -> int:
    """Multiply-adds x 2 of a SAM ViT whose grid the windows tile exactly: patch embedding, the linear layers,
    attention (QK^T and AV) with its decomposed relative-position terms, and the neck's two convolutions."""
    grid = config.image_size // config.patch_size
    n, d, w = grid * grid, config.hidden_size, config.window_size
    assert grid % w == 0, "the analytic count assumes no window padding"
    flops = 2 * n * 3 * config.patch_size**2 * d  # patch embedding conv
    for layer in range(config.num_hidden_layers):
        flops += 2 * n * (d * 3 * d + d * d + 2 * d * config.mlp_dim)  # qkv, proj, 2 MLP layers
        span = grid if layer in config.global_attn_indexes else w  # tokens per attention row
        flops += 4 * n * span * span * d  # QK^T and AV over windows of span x span tokens
        flops += 4 * n * span * d  # relative position: one einsum per axis
    out = config.output_channels
    flops += 2 * n * d * out + 2 * n * out * out * 9  # neck: 1x1 then 3x3 conv
    return flops


def test_encoder_flops_match_the_analytic_count():
    segmenter = build_segmenter("tiny-random")
    expected = _analytic_encoder_flops(segmenter.model.config.vision_config)
    assert encoder_flops(segmenter) == pytest.approx(expected, rel=0.01)


def test_matmul_rate_counts_two_flops_per_multiply_add():
    rate = matmul_rate("cpu", torch.float32, size=128, repeats=2)
    assert 1e6 < rate < 1e14  # FLOP/s: far above nothing, far below any CPU's peak


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_main_on_the_tiny_preset(tmp_path, capsys, precision):
    out = tmp_path / "limit.json"
    argv = ["--precision", precision, "--batch-size", "2", "--repeats", "2", "--matmul-size", "256"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["compute_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[precision]
    assert result["attention_implementation"] == "sdpa"
    assert result["encoder_gflops_per_image"] == pytest.approx(0.0225, rel=0.01)
    assert result["matmul_tflops_per_s"] > 0 and result["encoder_images_per_s"] > 0
    assert 0 < result["fraction_of_limit"] < 1.5
    assert "of the limit" in capsys.readouterr().out


def test_main_refuses_fp16_on_the_cpu(capsys):
    assert main(["--precision", "fp16"]) == 2
    assert "fp16" in capsys.readouterr().err
