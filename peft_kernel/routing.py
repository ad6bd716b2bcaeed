"""Per-forward routing of batch rows to adapters for mixed batches (``adapter_names=[...]``).

``PeftModel.forward`` builds one :class:`Routing` per call and publishes it through a context
variable; every adapter layer reads the same object, so grouping rows by adapter happens once per
forward, not once per layer. ``"__base__"`` rows get no adapter.

A method that decides per token how much of each adapter a layer adds (a mixture of experts whose
gate runs as a model-level pass before the forward) publishes an :class:`AdapterMix` the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch

BASE_ADAPTER = "__base__"

_current: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("peft_kernel_routing", default=None)


class Routing:
    """Rows of a batch grouped by adapter name, with index tensors cached per device."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.unique = tuple(dict.fromkeys(self.names))
        self._rows = {a: [i for i, n in enumerate(self.names) if n == a] for a in self.unique}
        self._cache: dict[tuple[torch.device, int], dict[str, torch.Tensor]] = {}
        self._slot_cache: dict[tuple[torch.device, int, tuple[str, ...]], torch.Tensor] = {}
        self._memo: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self.names)

    def _repeat(self, batch: int) -> int:
        if batch % len(self.names):
            from peft_kernel.errors import MixedBatchError

            raise MixedBatchError(
                f"adapter_names has {len(self.names)} entries but the layer sees a batch of {batch} rows; "
                "pass one adapter name per input row."
            )
        return batch // len(self.names)

    def groups(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """``{adapter: row indices}`` for a batch of ``batch`` rows (a multiple of the names when
        generate expands each row into beams or several sequences)."""
        key = (device, batch)
        if key not in self._cache:
            repeat = self._repeat(batch)
            self._cache[key] = {
                a: torch.tensor([r * repeat + k for r in rows for k in range(repeat)], device=device, dtype=torch.long)
                for a, rows in self._rows.items()
            }
        return self._cache[key]

    def slots(self, batch: int, device: torch.device, order: tuple[str, ...]) -> torch.Tensor:
        """Per-row position of each row's adapter in ``order`` (``-1`` where the row's adapter is
        not in ``order``, such as ``"__base__"``) — for stacked-weight kernels."""
        key = (device, batch, order)
        if key not in self._slot_cache:
            repeat = self._repeat(batch)
            index = {a: i for i, a in enumerate(order)}
            ids = [index.get(n, -1) for n in self.names for _ in range(repeat)]
            self._slot_cache[key] = torch.tensor(ids, device=device, dtype=torch.long)
        return self._slot_cache[key]

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """A value derived from this routing, built on first use and shared by every layer for the
        rest of the forward (or generate) call: per-row metadata, validated weight stacks...
        Keys are chosen by the caller; prefix them with the plugin's name."""
        try:
            return self._memo[key]
        except KeyError:
            value = self._memo[key] = build()
            return value


def current_routing() -> Routing | None:
    """The routing of the forward in progress, or ``None`` outside a mixed batch."""
    return _current.get()


@contextlib.contextmanager
def routed(names: Sequence[str] | None) -> Iterator[Routing | None]:
    """Publish a routing for the duration of one forward (or generate) call."""
    if names is None:
        yield None
        return
    token = _current.set(Routing(names))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


_task_ids: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("peft_kernel_task_ids", default=None)


def current_task_ids(batch: int, device: torch.device) -> torch.Tensor | None:
    """The rows' task ids of the forward in progress as a long tensor of ``batch`` rows on ``device``
    (ids given for ``batch / k`` rows are repeated ``k`` times each, for generate's beams and returned
    sequences, as adapter names are), or ``None`` where none were given."""
    ids = _task_ids.get()
    if ids is None:
        return None
    if batch % ids.numel():
        from peft_kernel.errors import MixedBatchError

        raise MixedBatchError(
            f"task_ids has {ids.numel()} entries but the layer sees a batch of {batch} rows; pass one task id per input row."
        )
    return ids.to(device).repeat_interleave(batch // ids.numel())


@contextlib.contextmanager
def tasks_routed(task_ids: Any) -> Iterator[torch.Tensor | None]:
    """Publish the rows' ``task_ids`` (a sequence or tensor of integers, one per row; ``None`` for
    none) for the duration of one forward (or generate) call."""
    ids = None
    if task_ids is not None:
        ids = torch.as_tensor(task_ids).reshape(-1)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.numel() == 0:
            from peft_kernel.errors import MixedBatchError

            raise MixedBatchError(f"task_ids must hold one integer task id per batch row; got {ids.numel()} "
                                  f"of dtype {ids.dtype}.")
        ids = ids.long()
    token = _task_ids.set(ids)
    try:
        yield ids
    finally:
        _task_ids.reset(token)


class AdapterMix:
    """Per-token weights of several adapters for one forward: every adapter layer that
    ``weights_for`` answers adds ``sum_i weights[..., i] * delta(x, adapters[i])`` to its base
    output (:meth:`peft_kernel.layer.AdapterLayer.weighted_forward`) instead of its active adapters.

    ``weights_for(layer)`` returns a tensor whose last dim has one entry per name in ``adapters`` and
    whose leading dims broadcast against the layer's output without its feature dim
    (``[batch, seq, n]`` for a transformer), or ``None`` to let the layer compute as usual."""

    def __init__(self, adapters: Sequence[str], weights_for: Callable[[Any], torch.Tensor | None]):
        self.adapters = tuple(adapters)
        self.weights_for = weights_for


_mix: contextvars.ContextVar[AdapterMix | None] = contextvars.ContextVar("peft_kernel_adapter_mix", default=None)


def current_adapter_mix() -> AdapterMix | None:
    """The :class:`AdapterMix` of the forward in progress, or ``None``."""
    return _mix.get()


@contextlib.contextmanager
def adapter_mix(mix: AdapterMix | None) -> Iterator[AdapterMix | None]:
    """Publish ``mix`` for the duration of one forward pass (``None`` publishes nothing)."""
    token = _mix.set(mix)
    try:
        yield mix
    finally:
        _mix.reset(token)
