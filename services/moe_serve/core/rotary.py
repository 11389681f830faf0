"""Rotary position embeddings (RoPE), the "rotate half" form that HF checkpoints are trained with.

Legend: T = tokens, N = heads, D = head dim.
"""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """cos/sin tables for arbitrary positions; each sequence in a batch may sit at its own offset."""

    def __init__(self, head_dim: int, theta: float, scaling_factor: float = 1.0):
        # Frequencies in float32 as transformers computes them, whatever the model dtype.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.inv_freq = 1.0 / (theta ** exponents) / scaling_factor  # [D/2]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int -> (cos [T, D], sin [T, D]) in `dtype`."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [-x2, x1] where x1, x2 are the halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, N, D] rotated by cos/sin [T, D]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
