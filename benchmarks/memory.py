"""Memory accounting without a GPU: bytes held by a model, and the peak of tensor bytes alive
during one call (tracked at the dispatcher: every op's output storage counted until freed)."""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def resident_bytes(model: nn.Module) -> int:
    """Parameters and buffers, plus the low-rank stacks, each storage once: a stack is the storage
    of the adapters it adopted (their parameters are views of it), so only its rank padding and the
    tensors it had to copy (derived factors) add to the parameters' bytes."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for module in model.modules():
        stack = module.__dict__.get("_low_rank_stack")
        for t in (getattr(stack, "A", None), getattr(stack, "Bt", None), getattr(stack, "bias", None)):
            if t is not None:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class _Peak(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if not key:
                    continue
                if key not in self.live:  # a new storage (views of a tracked one keep it alive)
                    self.live[key] = storage.nbytes()
                    self.refs[key] = 0
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors allocated by ``fn`` and alive at the same time (the output included)."""
    tracker = _Peak()
    with tracker:
        result = fn()
    del result
    return tracker.peak
