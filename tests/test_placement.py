"""Expert ranges, per-layer selections and placement files."""

import pytest

from moe_client.ownership import format_ownership, format_ranges, from_messages, to_messages
from moe_serve.model.config import spec_from_config
from moe_serve.model.placement import PlacementError, missing_pairs, parse_ranges, resolve_ownership
from moe_serve.model.synthetic import SyntheticConfig

SPEC = spec_from_config(SyntheticConfig(num_experts=8, num_hidden_layers=3).to_json())


def test_ranges_round_trip():
    assert parse_ranges("0-3,6, 9-10") == [0, 1, 2, 3, 6, 9, 10]
    assert format_ranges([0, 1, 2, 3, 6, 9, 10]) == "0-3,6,9-10"


def test_ownership_travels_as_layer_experts_messages():
    """GetInfo and GetModelInfo carry ownership as LayerExperts; `moe-client info` prints it as ranges."""
    owned = resolve_ownership(SPEC, ["1:4-7", "0:0-3,6"])
    messages = to_messages(owned)
    assert [(m.layer, list(m.experts)) for m in messages] == [(1, [4, 5, 6, 7]), (0, [0, 1, 2, 3, 6])]
    assert from_messages(messages) == {0: (0, 1, 2, 3, 6), 1: (4, 5, 6, 7)}
    assert format_ownership(from_messages(messages)) == ["0:0-3,6", "1:4-7"]


@pytest.mark.parametrize("text,needle", [("a-b", "'a-b'"), ("3-1", "'3-1'"), ("", "empty"), ("-2", "'-2'")])
def test_bad_ranges_are_named(text, needle):
    with pytest.raises(PlacementError, match=needle):
        parse_ranges(text)


def test_selections():
    assert resolve_ownership(SPEC, "0-1") == {0: (0, 1), 1: (0, 1), 2: (0, 1)}
    assert resolve_ownership(SPEC, ["1:4-7", "2:0"]) == {1: (4, 5, 6, 7), 2: (0,)}
    assert resolve_ownership(SPEC, {"0": "all"})[0] == tuple(range(8))
    with pytest.raises(PlacementError, match=r"expert ids 8-9 out of range"):
        resolve_ownership(SPEC, "6-9")
    with pytest.raises(PlacementError, match=r"layer 5 is not a MoE layer"):
        resolve_ownership(SPEC, ["5:0"])


def test_missing_pairs():
    owned = [resolve_ownership(SPEC, "0-5"), resolve_ownership(SPEC, ["0:6-7", "1:6"])]
    assert missing_pairs(SPEC, owned) == {1: [7], 2: [6, 7]}
