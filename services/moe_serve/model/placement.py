"""Which experts live where: range strings ("0-3,6"), per-layer ownership, and placement files.

A placement file, like the seed's `expert_assignments`, names each expert server, its address and
its experts, either for all MoE layers or per layer:

    {"servers": [
        {"name": "worker1", "address": "10.0.0.2:50051", "experts": "0-3"},
        {"name": "worker2", "address": "10.0.0.3:50051", "experts": {"1": "4-7", "3": "0-7"}}
    ]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Ranges and ownership as text live in the light client (`moe-client info` prints them too).
from moe_client.ownership import Ownership, format_ranges
from moe_serve.core.spec import ModelSpec


class PlacementError(ValueError):
    """A malformed expert range, layer or placement file; names the bad value."""


def parse_ranges(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]."""
    ids: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            start, end = int(lo), int(hi) if sep else int(lo)
        except ValueError as err:
            raise PlacementError(f"expert range {part!r} in {text!r} is not N or N-M") from err
        if start < 0 or end < start:
            raise PlacementError(f"expert range {part!r} in {text!r} is empty or negative")
        ids.extend(range(start, end + 1))
    if not ids:
        raise PlacementError(f"expert list {text!r} is empty")
    return sorted(set(ids))


def resolve_ownership(spec: ModelSpec, experts: str | dict | list[str] | None) -> Ownership:
    """Expand an expert selection against a checkpoint's spec, checking every layer and id.

    `experts` is "all" / None (every expert), a range string for every MoE layer ("0-3,6"),
    a list of "LAYER:RANGES" strings, or a {layer: ranges} dict.
    """
    if experts is None or experts == "all":
        return {layer: tuple(range(spec.num_experts)) for layer in spec.moe_layers}
    per_layer: dict[int, str]
    if isinstance(experts, dict):
        per_layer = {_layer(spec, k): v for k, v in experts.items()}
    elif isinstance(experts, (list, tuple)) and any(":" in str(e) for e in experts):
        per_layer = {}
        for item in experts:
            layer, sep, ranges = str(item).partition(":")
            if not sep:
                raise PlacementError(f"expert selection {item!r} mixes 'LAYER:RANGES' with plain ranges")
            per_layer[_layer(spec, layer)] = ranges
    else:
        text = ",".join(experts) if isinstance(experts, (list, tuple)) else str(experts)
        per_layer = {layer: text for layer in spec.moe_layers}
    owned: Ownership = {}
    for layer, ranges in per_layer.items():
        ids = list(range(spec.num_experts)) if ranges == "all" else parse_ranges(ranges)
        bad = [e for e in ids if e >= spec.num_experts]
        if bad:
            raise PlacementError(
                f"layer {layer}: expert ids {format_ranges(bad)} out of range; the checkpoint has "
                f"{spec.num_experts} experts (0-{spec.num_experts - 1})"
            )
        owned[layer] = tuple(ids)
    return owned


def _layer(spec: ModelSpec, text: str | int) -> int:
    try:
        layer = int(text)
    except ValueError as err:
        raise PlacementError(f"layer {text!r} is not an integer") from err
    if layer not in spec.moe_layers:
        raise PlacementError(f"layer {layer} is not a MoE layer; MoE layers are {list(spec.moe_layers)}")
    return layer


@dataclass(frozen=True)
class ServerEntry:
    """One expert server of a placement file."""

    name: str
    address: str
    experts: str | dict


def read_placement(path: str | Path) -> list[ServerEntry]:
    """Parse a placement file; raises PlacementError naming the file and the bad entry."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PlacementError(f"placement file {path}: {err}") from err
    servers = doc.get("servers") if isinstance(doc, dict) else None
    if not isinstance(servers, list) or not servers:
        raise PlacementError(f"placement file {path}: needs a non-empty list 'servers'")
    entries = []
    for i, item in enumerate(servers):
        if not isinstance(item, dict) or "address" not in item or "experts" not in item:
            raise PlacementError(f"placement file {path}: servers[{i}] needs 'address' and 'experts'")
        entries.append(ServerEntry(str(item.get("name") or item["address"]), str(item["address"]), item["experts"]))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise PlacementError(f"placement file {path}: duplicate server names in {names}")
    return entries


def write_placement(path: str | Path, entries: list[ServerEntry]) -> None:
    """Write a placement file the gateway and expert servers read."""
    doc = {"servers": [{"name": e.name, "address": e.address, "experts": e.experts} for e in entries]}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def missing_pairs(spec: ModelSpec, owned: list[Ownership]) -> dict[int, list[int]]:
    """(layer -> experts) of the checkpoint that no ownership in `owned` covers."""
    missing: dict[int, list[int]] = {}
    for layer in spec.moe_layers:
        have = set().union(*(set(o.get(layer, ())) for o in owned)) if owned else set()
        lacking = [e for e in range(spec.num_experts) if e not in have]
        if lacking:
            missing[layer] = lacking
    return missing


def balanced_assignment(spec: ModelSpec, servers: int) -> list[Ownership]:
    """Each MoE layer's experts in contiguous ranges over `servers`, sizes differing by at most one; the
    servers that get one more rotate from layer to layer, so every server holds nearly the same bytes."""
    if servers < 1:
        raise PlacementError(f"number of servers {servers} must be at least 1")
    if servers > spec.num_experts * len(spec.moe_layers):
        raise PlacementError(f"{servers} servers but only {spec.num_experts * len(spec.moe_layers)} experts in all")
    base, extra = divmod(spec.num_experts, servers)
    owned: list[Ownership] = [{} for _ in range(servers)]
    for j, layer in enumerate(spec.moe_layers):
        start, first = 0, (j * extra) % servers  # the extras continue round-robin where the last layer's ended
        for s in range(servers):
            count = base + (1 if (s - first) % servers < extra else 0)
            if count:
                owned[s][layer] = tuple(range(start, start + count))
            start += count
    return owned


def placement_entries(spec: ModelSpec, owned: list[Ownership], addresses: list[str],
                      names: list[str] | None = None) -> list[ServerEntry]:
    """Placement-file entries for `owned[i]` on `addresses[i]`: one range string when every layer is alike."""
    if len(addresses) != len(owned):
        raise PlacementError(f"{len(addresses)} addresses for {len(owned)} servers: give one address per server")
    names = names or [f"worker{i + 1}" for i in range(len(owned))]
    entries = []
    for name, address, mine in zip(names, addresses, owned, strict=True):
        ranges = {str(layer): format_ranges(ids) for layer, ids in sorted(mine.items())}
        same = len(set(ranges.values())) == 1 and len(ranges) == len(spec.moe_layers)
        entries.append(ServerEntry(name, address, next(iter(ranges.values())) if same else ranges))
    return entries
def pick_entry(path: str | Path, entries: list[ServerEntry], name: str = "", index: str | None = None,
               hostname: str = "") -> ServerEntry:
    """This server's entry of a placement file: entry `index` (0-based, or 'hostname' for the trailing -N
    of `hostname`, a Kubernetes StatefulSet pod's ordinal), else the entry called `name`."""
    if index is not None and str(index).strip():
        text = str(index).strip()
        if text == "hostname":
            head, sep, tail = hostname.rpartition("-")
            if not (sep and head and tail.isdigit()):
                raise PlacementError(f"host name {hostname!r} does not end in -N, so it gives no placement index "
                                     "(StatefulSet pods are named NAME-0, NAME-1, ...)")
            text = tail
        if not text.isdigit():
            raise PlacementError(f"placement index {index!r} is not a non-negative integer or 'hostname'")
        if int(text) >= len(entries):
            raise PlacementError(f"placement index {int(text)} is out of range: placement file {path} has "
                                 f"{len(entries)} servers (0-{len(entries) - 1})")
        return entries[int(text)]
    if not name:
        raise PlacementError("--placement needs --name or --placement-index to pick this server's entry")
    by_name = {e.name: e for e in entries}
    if name not in by_name:
        raise PlacementError(f"placement file {path} has no server named {name!r}; it names {sorted(by_name)}")
    return by_name[name]
