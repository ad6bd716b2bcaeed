"""``ParameterLayer``: an adapter layer on one ``nn.Parameter`` of a module (a parameter target).

Some weights belong to no layer whose forward could be wrapped: the 3-D expert weights of
transformers' mixture-of-experts blocks are plain parameters their module indexes itself. A
parameter target keeps the module's own forward and adapts the parameter instead: during each
forward the parameter reads as ``W + sum(delta_weight(a))`` over the active adapters, through
``torch.nn.utils.parametrize`` (registered for the call and removed after it, so the module's
state dict and class are untouched between calls). Several parameters of one module are several
layers nested through ``base_layer``, the outer one adapting the later parameter (HF PEFT's
layout). A subclass implements the additive protocol's ``delta_weight`` in the parameter's own
shape; merging folds that delta into the parameter (see :meth:`AdapterLayer.adapted_tensor`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from peft_kernel.errors import MixedBatchError
from peft_kernel.layer import AdapterLayer
from peft_kernel.routing import current_adapter_mix, current_routing
from peft_kernel.targeting import base_of


class _AddDelta(nn.Module):
    """The parametrization ``W -> W + delta()`` (``delta`` is a plain callable, not a module, so the
    adapter layer does not become a child of the module it wraps). The sum is taken in the wider
    dtype and rounded once to the parameter's (float32 adapters on a bfloat16 base: HF PEFT's values)."""

    def __init__(self, delta: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight + self.delta()).to(weight.dtype)


class ParameterLayer(AdapterLayer):
    """Adapts ``getattr(base_of(self), parameter_name)`` instead of wrapping a forward.

    ``base_layer`` is the module that owns the parameter, or the parameter layer of another of its
    parameters. Mixed batches (``adapter_names``) are refused: the module's rows are not the
    batch's rows in general (experts see tokens grouped by expert). A subclass sets
    ``parameter_name`` in its ``__init__`` (left to it, so it can combine this class with its
    method's layer base in any order)."""

    def adapted_tensor(self) -> torch.Tensor:
        return getattr(base_of(self), self.parameter_name)

    def summed_delta(self, adapters: list[str]) -> torch.Tensor:
        """The sum of the ``adapters``' ``delta_weight``, in the parameter's shape."""
        total = self.delta_weight(adapters[0])
        for name in adapters[1:]:
            total = total + self.delta_weight(name)
        return total

    @contextlib.contextmanager
    def parametrized(self, adapters: list[str]) -> Iterator[None]:
        """The parameter reads as ``W + summed_delta(adapters)`` inside the context."""
        owner = base_of(self)
        parametrize.register_parametrization(owner, self.parameter_name,
                                             _AddDelta(lambda: self.summed_delta(adapters)), unsafe=True)
        try:
            yield
        finally:
            parametrize.remove_parametrizations(owner, self.parameter_name, leave_parametrized=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if current_routing() is not None:
            raise MixedBatchError(
                f"{type(self).__name__} (an adapter on the parameter {self.parameter_name!r}, a target_parameters "
                "target) does not support mixed adapter batches (adapter_names=); run one adapter per batch."
            )
        mix = current_adapter_mix()
        if mix is not None and mix.weights_for(self) is not None:
            raise MixedBatchError(
                f"{type(self).__name__} (an adapter on the parameter {self.parameter_name!r}) cannot weight adapters "
                "per token (an adapter mix such as X-LoRA's): its delta is one weight for every token."
            )
        active = [a for a in self._active_adapters if self.has_adapter(a)]
        if self.merged or not active:
            return self.base_layer(*args, **kwargs)
        with self.parametrized(active):
            return self.base_layer(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, {super().extra_repr()}"
