"""``torch.compile`` support: a forward whose graphs do not depend on Python-side adapter state.

Under ``torch.compile`` the eager paths' Python state (context variables holding the routing, dicts
of adapter names, Python float scalings, per-layer freshness checks) would be traced into guards,
so every new ``adapter_names`` list, ``set_adapter`` or ``hotswap_adapter`` would recompile. While
Dynamo traces a :class:`~peft_kernel.model.PeftModel` forward, the model instead calls
:func:`publish` — excluded from the graph with ``torch.compiler.disable``, so it runs eagerly on
every call, before the graph — which

- turns the rows' adapters into a tensor of model-level adapter ids (``rows``: ``[batch]`` for a
  mixed batch, ``[1]`` for the active adapter; id ``len(order)`` means no adapter), and
- lets every adapter layer refresh, eagerly and in place, the tensors its compiled forward reads
  (:meth:`~peft_kernel.layer.AdapterLayer.prepare_compiled`).

The layers' :meth:`~peft_kernel.layer.AdapterLayer.compiled_forward` then reads only tensors, whose
values (not identities or Python attributes) change with the routing and the adapters: switching
adapters or rows, ``set_adapter`` and a hotswap within the prepared rank reuse the graphs. Where any
layer cannot take this path (a method without it, several active adapters, autograd through the
adapters), :func:`publish` returns ``False`` and the eager paths run (and are traced as they are).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from peft_kernel.layer import AdapterLayer


class CompiledRouting:
    """The model-level adapter ids of the rows of the compiled forward in progress."""

    __slots__ = ("rows", "order", "ids")

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        """Long ``[batch]`` (mixed batch) or ``[1]`` (every row: the active adapter)."""
        self.order: tuple[str, ...] = ()
        """Adapter names by id; id ``len(order)`` is "no adapter"."""
        self.ids: list[int] = []
        """``rows`` as a list (a call with the same rows writes nothing)."""


_published = CompiledRouting()


def compiled_rows() -> torch.Tensor | None:
    """The rows' adapter ids (see :class:`CompiledRouting`), read by a layer's compiled forward."""
    return _published.rows


@torch.compiler.disable
def publish(layers: Sequence[AdapterLayer], order: Sequence[str], adapter_names: Sequence[str] | None,
            active: Sequence[str], device: Any) -> bool:
    """Publish the rows' adapter ids for a compiled forward and let every layer refresh its tensors;
    ``False`` (nothing published) where some layer cannot run the compiled path. ``adapter_names``
    were already checked by the model; ``None`` serves the ``active`` adapter on every row."""
    order = tuple(order)
    if adapter_names is None and len(active) != 1:
        _published.rows = None
        return False
    if not layers or not all(layer.prepare_compiled(order) for layer in layers):
        _published.rows = None
        return False
    ids = {n: i for i, n in enumerate(order)}
    names = [active[0]] if adapter_names is None else adapter_names
    rows = [ids.get(n, len(order)) for n in names]
    current = _published.rows
    if current is not None and current.shape[0] == len(rows) and current.device == torch.device(device):
        if rows != _published.ids:
            current.copy_(torch.tensor(rows))  # same tensor: the graph's input keeps its identity
    else:
        _published.rows = torch.tensor(rows, dtype=torch.long, device=device)
    _published.order, _published.ids = order, rows
    return True
