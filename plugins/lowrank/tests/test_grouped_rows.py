"""``peft_kernel_lowrank.grouped``: the rows of a mixed batch sorted by adapter once per forward,
gathered and added back (in place without autograd, out of place with it)."""

import torch

from peft_kernel.plugin_api import Routing
from peft_kernel_lowrank.grouped import sorted_rows


def test_rows_are_grouped_in_first_use_order_and_memoised():
    routing = Routing(["b", "__base__", "a", "b", "c"])
    rows = sorted_rows(routing, ["a", "b"], 5, torch.device("cpu"))
    assert rows.names == ("b", "a")
    assert rows.spans == [("b", 0, 2), ("a", 2, 3)]
    assert rows.perm.tolist() == [0, 3, 2] and not rows.identity
    assert sorted_rows(routing, ["b", "a"], 5, torch.device("cpu")) is rows  # shared by layers holding the same adapters
    assert sorted_rows(routing, ["z"], 5, torch.device("cpu")) is None


def test_repeated_rows_follow_their_name():
    """A batch that is a multiple of the names (generate's beams) repeats each name's rows."""
    rows = sorted_rows(Routing(["b", "a"]), ["a", "b"], 4, torch.device("cpu"))
    assert rows.spans == [("b", 0, 2), ("a", 2, 4)] and rows.perm.tolist() == [0, 1, 2, 3] and rows.identity


def test_gather_and_add_to():
    rows = sorted_rows(Routing(["b", "__base__", "a", "b"]), ["a", "b"], 4, torch.device("cpu"))
    x = torch.arange(8.0).view(4, 2)
    assert torch.equal(rows.gather(x), x[[0, 3, 2]])
    delta = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
    expected = x.clone()
    expected[[0, 3, 2]] += delta.float()
    with torch.no_grad():
        result = x.clone()
        assert rows.add_to(result, delta) is result  # in place, rounded to the result's dtype
    assert torch.equal(result, expected)
    base = x.clone().requires_grad_()
    out = rows.add_to(base, delta)  # autograd: a new tensor
    assert out is not base and torch.equal(out.detach(), expected)


def test_grouped_batch_moves_nothing():
    rows = sorted_rows(Routing(["a", "a", "b", "b"]), ["a", "b"], 4, torch.device("cpu"))
    x = torch.randn(4, 3)
    assert rows.identity and rows.gather(x) is x
    with torch.no_grad():
        result = x.clone()
        rows.add_to(result, torch.ones(4, 3))
    assert torch.equal(result, x + 1)
