"""Wire dtypes of a RunExperts call, chosen per direction and per call size.

Why per direction: the hidden states to the experts tolerate fp8 (a scale per token keeps each row's
range), while the partial sums coming back are added across servers, so their rounding adds up; fp8
there costs more error for fewer saved bytes (docs/deployment-sizing.md, benchmarks/wire_error.py).
Why per size: a small call (a decode step's few tokens) is bound by the round trip, not the bytes, so
it can travel in float32 at no cost in time while large prefill calls travel compressed.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_client import wire


@dataclass(frozen=True)
class WireChoice:
    """`to_experts` / `back` for calls of `full_below_tokens` tokens or more; float32 both ways below that."""

    to_experts: int = wire.FLOAT32
    back: int | None = None  # None: as to_experts
    full_below_tokens: int = 0  # 0: every call uses to_experts / back

    def __post_init__(self) -> None:
        if self.full_below_tokens < 0:
            raise ValueError(f"--full-precision-below-tokens {self.full_below_tokens} must be 0 or more")

    def for_call(self, tokens: int) -> tuple[int, int]:
        """(wire dtype of the hidden states, wire dtype of the reply) for a call of `tokens` tokens."""
        if tokens < self.full_below_tokens:
            return wire.FLOAT32, wire.FLOAT32
        return self.to_experts, self.to_experts if self.back is None else self.back

    @classmethod
    def of(cls, to_experts: str, back: str | None = None, full_below_tokens: int = 0) -> WireChoice:
        """From dtype names ('float32', 'bf16', 'float8_e4m3', ...); `back` None or '' follows `to_experts`."""
        return cls(wire.dtype_from_name(to_experts), wire.dtype_from_name(back) if back else None, full_below_tokens)
