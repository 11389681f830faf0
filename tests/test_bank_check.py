"""ExpertBank.check, the ownership check of every RunExperts call: its lookup table says what the sorted-ids
reference says, for random ownerships and ids, and follows the ownership when experts are dropped live."""

import pytest
import torch

from moe_serve.core.grouped import StackedExperts
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc.errors import InvalidArgument, NotFound


def reference(owned: set[int], ids: torch.Tensor) -> type[Exception] | None:
    unique = torch.unique(ids).tolist()
    if unique[0] < -1:
        return InvalidArgument
    return NotFound if any(e >= 0 and e not in owned for e in unique) else None


def outcome(bank: ExpertBank, layer: int, ids: torch.Tensor) -> type[Exception] | None:
    try:
        bank.check(layer, ids)
    except (InvalidArgument, NotFound) as err:
        return type(err)
    return None


def test_check_agrees_with_the_reference(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint)
    experts = checkpoint.spec.num_experts
    for _ in range(50):
        owned = set(torch.randperm(experts)[: torch.randint(1, experts + 1, ()).item()].tolist())
        bank = ExpertBank.load(checkpoint, {0: tuple(sorted(owned))}, [torch.device("cpu")], torch.float32)
        tokens = torch.randint(1, 40, ()).item()
        ids = torch.randint(-1, experts, (tokens, 2), dtype=torch.int32)
        if torch.rand(()) < 0.3:  # sometimes only owned ids, so that the accepting path is drawn too
            pool = torch.tensor([*sorted(owned), -1], dtype=torch.int32)
            ids = pool[torch.randint(0, len(pool), (tokens, 2))]
        if torch.rand(()) < 0.1:
            ids[torch.randint(0, tokens, ()), 0] = torch.randint(-50, -1, ()).item()
        if torch.rand(()) < 0.1:
            ids[torch.randint(0, tokens, ()), 1] = torch.randint(experts, experts + 50, ()).item()
        assert outcome(bank, 0, ids) == reference(owned, ids), (sorted(owned), ids.tolist())
    with pytest.raises(NotFound, match="layer 1 has no experts"):
        bank.check(1, torch.zeros(1, 2, dtype=torch.int32))


def test_check_follows_a_live_drop(tiny_checkpoint):
    """replace_stacks (what a live drop or load does) swaps the ownership: the cached table goes with it."""
    checkpoint = Checkpoint(tiny_checkpoint)
    bank = ExpertBank.load(checkpoint, {0: (0, 1, 2, 3)}, [torch.device("cpu")], torch.float32)
    ids = torch.tensor([[0, 3]], dtype=torch.int32)
    bank.check(0, ids)  # the table of (0, 1, 2, 3) is built and cached
    ((device, stacked),) = bank.stacks(0).items()
    kept = StackedExperts(stacked.expert_ids[:3], stacked.gate_up[:3], stacked.down[:3])  # expert 3 dropped
    bank.replace_stacks(0, {device: kept})
    with pytest.raises(NotFound, match="experts 3 are not on this server"):
        bank.check(0, ids)
    bank.check(0, ids[:, :1])
