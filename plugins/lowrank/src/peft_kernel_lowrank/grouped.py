"""Rows of a mixed batch sorted by adapter, for layers that run one product per adapter group.

A layer whose per-adapter update is cheap to apply to a contiguous slice of rows (MiSS's block
product on shard sums computed once for the whole batch) sorts the rows it adapts once (:meth:`SortedRows.gather`), computes every group's update into one buffer in that
order, and adds the buffer back with one ``index_add_`` (:meth:`SortedRows.add_to`): no per-row
loop, no per-group gather or scatter. The sort order is built once per forward and shared by every
layer that holds the same adapters (memoised on the forward's ``Routing``); when the rows already
come grouped and every row is adapted, nothing is gathered or scattered at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peft_kernel_lowrank.mixed import can_add_inplace

if TYPE_CHECKING:
    from peft_kernel.plugin_api import Routing


class SortedRows:
    """The rows of one forward whose adapter is in ``names``, grouped by adapter."""

    def __init__(self, routing: Routing, names: tuple[str, ...], batch: int, device: torch.device) -> None:
        repeat = routing._repeat(batch)  # the core's check: a clear error when rows and names disagree
        by_name: dict[str, list[int]] = {name: [] for name in names}
        for i, name in enumerate(routing.names):
            if name in by_name:
                by_name[name] += range(i * repeat, (i + 1) * repeat)
        self.names = names
        self.spans: list[tuple[str, int, int]] = []
        """``(adapter, start, end)``: the adapter's rows are ``[start, end)`` of the sorted rows."""
        rows: list[int] = []
        for name in names:
            self.spans.append((name, len(rows), len(rows) + len(by_name[name])))
            rows += by_name[name]
        self.identity = rows == list(range(batch))
        self.perm = torch.tensor(rows, device=device, dtype=torch.long)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s adapted rows in sorted order (``x`` itself when nothing moves)."""
        return x if self.identity else x.index_select(0, self.perm)

    def add_to(self, result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``result`` plus ``delta`` (rows in sorted order) on the rows they belong to; in place
        where autograd allows. ``delta`` is rounded to ``result``'s dtype first, as a per-group
        ``index_add`` of each delta would."""
        delta = delta.to(result.dtype)
        inplace = can_add_inplace(result)
        if self.identity:
            return result.add_(delta) if inplace else result + delta
        return result.index_add_(0, self.perm, delta) if inplace else result.index_add(0, self.perm, delta)


def sorted_rows(routing: Routing, held: list[str] | tuple[str, ...], batch: int,
                device: torch.device) -> SortedRows | None:
    """The batch's rows whose adapter is in ``held`` (a layer's adapters), grouped in the order the
    adapters first appear in ``adapter_names``; ``None`` when no row uses one of them."""
    names = tuple(n for n in routing.unique if n in held)
    if not names:
        return None
    return routing.memo(("peft_kernel_lowrank.sorted_rows", names, batch, device),
                        lambda: SortedRows(routing, names, batch, device))
