"""Model FLOPs per token of a GPT config and the dense bf16 peak of known accelerators, for the
model FLOPs utilisation (MFU) of training runs: MFU = tokens/s x FLOPs per token / (devices x peak).

FLOPs per trained token (forward + backward, PaLM appendix B): 6 N + 12 n_layer dim S, with N
the parameters used in matmuls (embedding tables are look-ups: not counted) and S the number of
positions each query attends over (the attention score and value products; counted in full for
causal attention too, as PaLM and nanoGPT do).
"""
from __future__ import annotations

from typing import Optional

from system.models.gpt import GPTConfig

# dense bf16 tensor-core peak (FLOP/s) by a substring of torch.cuda.get_device_name(), most specific first
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 (no bf16)
)


def peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a GPU from its name (torch.cuda.get_device_name); None if unknown."""
    for key, flops in PEAK_BF16:
        if key.lower() in device_name.lower():
            return flops
    return None


def device_peak_flops(device) -> Optional[float]:
    """Peak FLOP/s of a torch device: None on CPU or for an unknown GPU."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def gpt_matmul_params(cfg: GPTConfig) -> int:
    """Parameters of a GPT used in a matrix product per token: blocks and head (embedding tables are
    look-ups; the AdaLN modulation runs once per sequence, not per token)."""
    d, h, layers = cfg.dim, cfg.mlp_hidden, cfg.n_layer
    attn = 4 * d * d + (3 * d if cfg.qkv_bias else 0) + (d if cfg.proj_bias else 0)
    mlp = 3 * d * h
    per_layer = attn + mlp
    n_out = 2 * cfg.n_bits if cfg.head == "bitwise" else cfg.vocab_size
    head = d * n_out + (n_out if cfg.output_bias else 0)
    proj = (cfg.code_dim or 0) * d
    bits_in = cfg.n_bits * d if cfg.head == "bitwise" else 0  # the bitwise input embedding is a linear map
    return layers * per_layer + head + proj + bits_in


def gpt_flops_per_token(cfg: GPTConfig, bidirectional: Optional[bool] = None) -> float:
    """Training FLOPs (forward + backward) per token: 6 N + 12 n_layer dim S (module docstring)."""
    bidi = cfg.bidirectional if bidirectional is None else bidirectional
    positions = cfg.cls_token_num + cfg.seq_len if bidi else cfg.seq_len
    return 6.0 * gpt_matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.dim * positions
