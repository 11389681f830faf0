"""The gateway's routing plan against plain Python over the same ids."""

import torch

from moe_serve.gateway.routing_plan import expert_counts, rows_for


def _random_ids(tokens: int, experts: int, k: int) -> torch.Tensor:
    """Distinct experts per token, some slots -1 (as padding and failover leave them)."""
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    return torch.where(torch.rand(tokens, k) < 0.2, -1, ids)


def test_counts_and_rows_match_a_loop_over_the_pairs():
    experts, k = 16, 4
    ids = _random_ids(300, experts, k)
    pairs = [int(e) for e in ids.reshape(-1) if e >= 0]
    assert expert_counts(ids, experts) == {e: pairs.count(e) for e in sorted(set(pairs))}
    chosen = sorted(torch.randperm(experts)[:5].tolist())
    rows, mine = rows_for(ids, chosen, experts)
    want_rows = [t for t in range(len(ids)) if any(int(e) in chosen for e in ids[t])]
    assert rows.tolist() == want_rows
    assert mine.dtype == torch.int32
    assert mine.tolist() == [[int(e) if int(e) in chosen else -1 for e in ids[t]] for t in want_rows]


def test_no_rows_and_ids_past_the_experts():
    ids = torch.tensor([[0, -1], [1, 2]])
    rows, mine = rows_for(ids, [3], num_experts=4)
    assert rows.numel() == 0 and tuple(mine.shape) == (0, 2)
    # An id no server can own is still counted: the dispatcher then fails the layer naming it.
    assert expert_counts(torch.tensor([[0, 9], [-1, 0]]), num_experts=4) == {0: 2, 9: 1}
