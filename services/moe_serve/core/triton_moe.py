"""Fused GPU kernels for the grouped expert path (Triton), replacing chains of elementwise passes.

- `swiglu_scale`: act = silu(gate) * up * scale, one read of [N, 2I] and one write of [N, I]
  (torch needs three kernels and about 2.5x the bytes).
- `gather_sum`: out[t] = sum over k of y[inv[t*K + k]] where the pair is valid, accumulated in float32:
  un-permutes, masks and reduces the grouped GEMM's output in one pass, deterministically.
Only imported where a CUDA device and Triton exist; `core.grouped` falls back to torch otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_scale_kernel(gate_up, scale, out, width, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g = tl.load(gate_up + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up + row * stride_gu + width + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale + row)
    act = g * tl.sigmoid(g) * u * s
    tl.store(out + row * stride_out + cols, act.to(out.dtype.element_ty), mask=mask)


def swiglu_scale(gate_up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, 2I] gate|up and [N] float32 scale -> [N, I] silu(gate) * up * scale in gate_up's dtype."""
    n, two_i = gate_up.shape
    width = two_i // 2
    out = torch.empty(n, width, device=gate_up.device, dtype=gate_up.dtype)
    if n:
        block = 1024
        _swiglu_scale_kernel[(n, triton.cdiv(width, block))](gate_up, scale.float().contiguous(), out, width,
                                                            gate_up.stride(0), out.stride(0), BLOCK=block)
    return out


@triton.jit
def _gather_sum_kernel(y, inv, valid, out, hidden, K: tl.constexpr, stride_y, stride_out, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        pair = token * K + k
        row = tl.load(inv + pair)
        keep = tl.load(valid + pair)
        vals = tl.load(y + row * stride_y + cols, mask=mask & (keep != 0), other=0.0)
        acc += vals.to(tl.float32)
    tl.store(out + token * stride_out + cols, acc, mask=mask)


def gather_sum(y: torch.Tensor, order: torch.Tensor, valid: torch.Tensor, tokens: int, k: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y [T*K, H] rows sorted by `order` (y[i] is pair order[i]); -> [T, H] float32 sum over valid pairs."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    hidden = y.shape[1]
    if out is None:
        out = torch.empty(tokens, hidden, device=y.device, dtype=torch.float32)
    if tokens:
        block = 1024
        _gather_sum_kernel[(tokens, triton.cdiv(hidden, block))](y, inv, valid.to(torch.int8), out, hidden, k,
                                                                y.stride(0), out.stride(0), BLOCK=block)
    return out
