"""Mixed batches for layers whose adapters differ only in small trainable tensors around frozen
projections the adapters share: VeRA's ``lambda_d`` / ``lambda_b`` around ``vera_A`` / ``vera_B``,
RandLora's ``lambda`` / ``gamma`` around its bases.

Adapters made with the same projections (same seed, rank and largest layer: HF PEFT's rule for
these methods) form one *class*. For a class, the projection GEMMs run once over every row of the
batch, and each row applies its own adapter's tensors (the same for all of the row's tokens),
gathered from a per-layer *stack* of them
(slot ``len(names)`` holds zeros: rows whose adapter is elsewhere or ``"__base__"`` add exact
zeros). That costs about one adapter's forward whatever the number of adapters in the batch.
Adapters whose projections differ (another set of target modules, a loaded checkpoint's own
projections) form classes of their own, one such pass each.

A layer opts in by implementing :class:`SharedProjectionLayer`'s methods (see
:class:`peft_kernel_lowrank.projections.ProjectionLayer`). The classes are cached per layer until a
projection is replaced, moved or written; the stacks until one of their adapter's tensors or
settings changes (built afresh, differentiably, under autograd). Both are validated once per
forward (memoised on the forward's ``Routing``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from peft_kernel_lowrank.derived import DerivedFactors
from peft_kernel_lowrank.mixed import base_output

if TYPE_CHECKING:
    from peft_kernel.plugin_api import Routing

FULL_PRECISION = (torch.float32, torch.float64)
"""The dtypes the shared path serves; half-precision adapters keep the paths that round as HF PEFT does."""


class Rows:
    """Where a class's adapters sit in a batch (built once per forward and class, shared by every layer)."""

    def __init__(self, routing: Routing, names: tuple[str, ...], batch: int, device: torch.device) -> None:
        self._routing, self._names, self._batch, self._device = routing, names, batch, device
        slots = routing.slots(batch, device, names)  # -1 where the row's adapter is not in the class
        self.slots = slots.masked_fill(slots < 0, len(names))
        """``[batch]``: each row's slot in the class's stacks (the zeros slot where it has none)."""
        self._groups: tuple[tuple[int, torch.Tensor], ...] | None = None

    @property
    def groups(self) -> tuple[tuple[int, torch.Tensor], ...]:
        """``(slot, row indices)`` for each adapter of the class the batch uses."""
        if self._groups is None:
            rows = self._routing.groups(self._batch, self._device)
            self._groups = tuple((i, rows[n]) for i, n in enumerate(self._names) if n in rows)
        return self._groups


class SharedClass(NamedTuple):
    """Adapters of one layer with equal projections."""

    names: tuple[str, ...]
    projections: tuple[torch.Tensor, ...]
    """The first adapter's :meth:`SharedProjectionLayer.shared_projections` (equal for all), in
    the stacks' dtype, contiguous."""
    stacks: tuple[torch.Tensor, ...] | None
    """Each :meth:`SharedProjectionLayer.shared_vectors` tensor stacked ``[len(names) + 1, ...]``,
    the last slot zeros; ``None`` when the adapters' tensors differ in dtype, device or shape."""
    dtype: torch.dtype | None
    """The stacks' one dtype (``None``: no stacks, or stacks of several dtypes)."""


class SharedProjectionLayer(Protocol):
    """What a layer supplies for the shared path."""

    projection_settings: dict[str, Any]
    """The adapters the layer holds (the keys)."""

    def shared_ready(self, adapter_name: str) -> bool:
        """Whether ``adapter_name``'s rows may take the shared path in training (no live dropout)."""

    def shared_projections(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The layer's slices of the adapter's frozen projections (compared across adapters)."""

    def shared_sources(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The tensors :meth:`shared_projections` slices (watched for writes and moves)."""

    def shared_vectors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The adapter's own tensors, stacked per slot (zeros: no update), made from its tensors in
        ``adapter_layer_names`` and ``scale(adapter_name)`` only."""

    adapter_layer_names: tuple[str, ...]
    """The containers of the adapter's tensors (watched for writes and moves)."""

    def scale(self, adapter_name: str) -> float:
        """The adapter's scalar setting (watched)."""

    shared_max_tokens: int
    """The most tokens (rows times tokens per row) a batch may have for the shared path; longer
    ones (prefill) take the layer's other mixed paths, where those measured faster."""

    def shared_mixed_add(self, result: torch.Tensor, x: torch.Tensor, projections: tuple[torch.Tensor, ...],
                         stacks: tuple[torch.Tensor, ...], rows: Rows) -> torch.Tensor:
        """``result [batch, tokens, out]`` plus each row's update for ``x [batch, tokens, in]``."""


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    """Whether two adapters' projection slices hold the same values (same memory: without reading it)."""
    for s, t in zip(a, b):
        if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
            return False
        if not (s.data_ptr() == t.data_ptr() and s.stride() == t.stride()) and not torch.equal(s, t):
            return False
    return True


def projection_classes(layer: SharedProjectionLayer, names: tuple[str, ...]
                       ) -> tuple[tuple[tuple[str, ...], tuple[torch.Tensor, ...]], ...]:
    """``names`` grouped by equal projections, in order of first appearance, each group with its
    first adapter's projections."""
    members: list[list[str]] = []
    firsts: list[tuple[torch.Tensor, ...]] = []
    for name in names:
        projections = layer.shared_projections(name)
        for group, first in zip(members, firsts):
            if _same(projections, first):
                group.append(name)
                break
        else:
            members.append([name])
            firsts.append(projections)
    return tuple((tuple(group), first) for group, first in zip(members, firsts))


class SharedState:
    """A layer's classes with their stacks (one instance per layer). Freshness is one check over
    every tensor of the adapters (:func:`adapter_tensors`) and their scales; the classes alone are
    cached on the projection buffers, so autograd, which rebuilds the stacks each forward, does not
    compare projections again."""

    def __init__(self) -> None:
        self._classes = DerivedFactors()
        self._plan = DerivedFactors()
        self._settings: tuple[Any, ...] = ()

    def plan(self, layer: Any) -> dict[str, SharedClass]:
        """``{adapter: its class}`` over the adapters the layer holds."""
        held = tuple(layer.projection_settings)
        settings = (held, tuple(layer.scale(n) for n in held))
        if settings != self._settings:  # adapters added, removed or rescaled
            self._plan.drop("plan")
            self._classes.drop("classes")
            self._settings = settings
        return self._plan.get("plan", adapter_tensors(layer, held), lambda: self._build(layer, held))

    def _build(self, layer: Any, held: tuple[str, ...]) -> dict[str, SharedClass]:
        sources = tuple(t for n in held for t in layer.shared_sources(n))
        classes = self._classes.get("classes", sources, lambda: projection_classes(layer, held))
        out = {}
        for names, projections in classes:
            stacks = _stack(layer, names)
            dtypes = {t.dtype for t in stacks or ()}
            dtype = dtypes.pop() if len(dtypes) == 1 else None
            if dtype is not None:  # in the stacks' dtype, contiguous: ready for the kernels
                projections = tuple(p.to(dtype).contiguous() for p in projections)
            entry = SharedClass(names, projections, stacks, dtype)
            out.update(dict.fromkeys(names, entry))
        return out


def adapter_tensors(layer: Any, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Every tensor of ``names`` in the layer's ``adapter_layer_names`` containers (``ParameterDict``
    / ``BufferDict``), read from the containers' own dicts: this runs once per layer and forward."""
    modules = layer._modules
    stores = [modules[c]._parameters or modules[c]._buffers for c in layer.adapter_layer_names]
    return tuple(store[n] for n in names for store in stores)


def _stack(layer: Any, names: tuple[str, ...]) -> tuple[torch.Tensor, ...] | None:
    per_adapter = [layer.shared_vectors(n) for n in names]
    stacks = []
    for parts in zip(*per_adapter):
        first = parts[0]
        if any(p.shape != first.shape or p.dtype != first.dtype or p.device != first.device for p in parts):
            return None
        stacks.append(torch.cat([torch.stack(parts), first.new_zeros((1, *first.shape))]))
    return tuple(stacks)


def state_of(layer: Any) -> SharedState:
    """The layer's :class:`SharedState` (a plain attribute: not a buffer, not in the state dict)."""
    state = layer.__dict__.get("_shared_projection_state")
    if state is None:
        state = layer.__dict__["_shared_projection_state"] = SharedState()
    return state


def drop_state(layer: Any) -> None:
    """Forget a layer's classes and stacks (an adapter was deleted)."""
    layer.__dict__.pop("_shared_projection_state", None)


def shared_mixed_forward(layer: Any, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mixed-batch output of ``layer`` through the shared projections, or ``None`` where the
    layer's other paths must run: extra arguments, an input that is not full precision, one
    adapter for the whole batch, an adapter not ready (live dropout in training, another dtype),
    adapters whose tensors cannot be stacked, or more tokens than ``layer.shared_max_tokens``."""
    if args or kwargs or x.dtype not in FULL_PRECISION or x.dim() < 2 or not x.shape[0]:
        return None
    batch, d_in, device = x.shape[0], x.shape[-1], x.device
    groups = routing.groups(batch, device)
    held = layer.projection_settings
    used = [n for n in groups if n in held]
    if len(groups) == 1 or not used or (layer.training and not all(layer.shared_ready(n) for n in used)):
        return None
    tokens = x.numel() // (batch * d_in)
    if batch * tokens > layer.shared_max_tokens:
        return None
    plan = routing.memo(("peft_kernel_lowrank.shared_plan", id(layer)), lambda: state_of(layer).plan(layer))
    classes = {id(plan[n]): plan[n] for n in used}.values()  # by identity: hashing one hashes its tensors
    if any(c.dtype != x.dtype for c in classes):
        return None
    result = base_output(layer.base_layer, x)
    x3 = x.reshape(batch, tokens, d_in)
    out = result.reshape(batch, tokens, result.shape[-1])
    for entry in classes:
        rows = routing.memo(("peft_kernel_lowrank.shared_rows", entry.names, batch, device),
                            lambda names=entry.names: Rows(routing, names, batch, device))
        out = layer.shared_mixed_add(out, x3, entry.projections, entry.stacks, rows)
    return result if out.data_ptr() == result.data_ptr() else out.reshape(result.shape)  # in place, or a new sum
