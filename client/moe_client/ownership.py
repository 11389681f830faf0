"""Expert ownership between the protocol's messages and text: ranges ("0-3,6") and layers ("0:0-3,6").

The protocol carries what a server owns as `LayerExperts` messages (a layer and its expert ids); people
read it as "layer:ranges" text, in the `moe-client info` output and in the services' logs and errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from moe_client.pb import experts_pb2

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


def from_messages(layers: Iterable[experts_pb2.LayerExperts]) -> Ownership:
    """LayerExperts messages -> {layer: sorted expert ids} (a layer named twice gets the ids of both)."""
    owned: dict[int, set[int]] = {}
    for entry in layers:
        owned.setdefault(entry.layer, set()).update(entry.experts)
    return {layer: tuple(sorted(ids)) for layer, ids in sorted(owned.items())}


def to_messages(owned: Mapping[int, Iterable[int]]) -> list[experts_pb2.LayerExperts]:
    """{layer: expert ids} -> LayerExperts messages, in the mapping's order."""
    return [experts_pb2.LayerExperts(layer=layer, experts=list(ids)) for layer, ids in owned.items()]
