"""Expert ownership as text: ranges ("0-3,6") and layers ("0:0-3,6").

People read what a server owns as "layer:ranges" text, in the client's output and in the services' logs
and errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

Ownership = dict[int, tuple[int, ...]]  # MoE layer -> sorted expert ids


def format_ranges(ids: Iterable[int]) -> str:
    """[0, 1, 2, 3, 6] -> '0-3,6'."""
    parts: list[str] = []
    values = sorted(set(ids))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def format_ownership(owned: Mapping[int, Iterable[int]]) -> list[str]:
    """{0: (0, 1, 2)} -> ['0:0-2'], layers ascending; layers without experts left out."""
    return [f"{layer}:{format_ranges(experts)}" for layer, experts in sorted(owned.items()) if experts]

