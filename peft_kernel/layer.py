"""``AdapterLayer``: the base every method's layer class builds on.

An adapter layer holds ``base_layer`` and, per adapter name, its parameters in ``nn.ModuleDict`` /
``nn.ParameterDict`` containers named in ``adapter_layer_names`` — so in-memory keys are
``<module>.<container>.<adapter>[.<param>]`` and on-disk keys the same without ``.<adapter>``.

A method implements ``update_layer`` (create one adapter's parameters) and either the additive
protocol — ``delta(x, adapter)`` and ``delta_weight(adapter)`` — from which this class derives the
forward, mixed batches, merge and unmerge; or overrides ``adapted_forward`` / ``mixed_forward`` /
``merge_into_base`` / ``unmerge_from_base`` for non-additive methods (multiplicative, orthogonal).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from peft_kernel.errors import MixedBatchError
from peft_kernel.routing import Routing, current_adapter_mix, current_routing

Fold = Callable[["AdapterLayer", str, bool, Literal["merge", "unmerge"]], object]
"""``fold(layer, adapter_name, safe_merge, direction)``: folds one adapter into or out of a layer's
base weights. The tuner passes ``Registry.merge`` (plugins' ``peft_kernel_merge`` hooks, then
:meth:`AdapterLayer.fold_adapter`); layers never look the registry up themselves."""


LowRankFactors = tuple[torch.Tensor, torch.Tensor, float]
"""``(A, B, scale)``: see :class:`LowRankLayer`."""


@runtime_checkable
class LowRankLayer(Protocol):
    """Optional protocol of adapter layers whose adapters are low-rank additions (LoRA; AdaLoRA,
    VeRA, DeLoRA, RandLora next). Family code — the stacked mixed-batch kernels of
    ``peft-kernel-lowrank``, backends such as Cloud AI 100 — reads adapters through it, never
    through a method's attribute names, so any layer implementing it gets them.

    ``low_rank_factors(adapter_name)`` returns ``(A, B, scale)`` such that, for an input
    ``x[..., in_features]``, the adapter adds ``scale * (x @ A.T) @ B.T`` to the base layer's output
    (plus ``scale * bias`` where the optional ``low_rank_bias(adapter_name)`` returns a ``[out]``
    bias). Shapes: ``A`` is ``[r, in_features]``, ``B`` is ``[out_features, r]`` (the orientation of
    ``nn.Linear`` weights, also for transformers' ``Conv1D``), ``scale`` a Python float. ``A``, ``B``
    and the bias are the layer's live tensors, not copies, so callers may cache what they derive
    and detect changes (identity, ``_version``, ``data_ptr``). It returns ``None`` whenever the
    adapter's output is not that product right now: the layer does not hold the adapter, its
    inputs are not features (``nn.Embedding`` looks rows up, ``nn.Conv*`` convolves: such layers
    return ``None``), the adapter is not purely low-rank (DoRA's weight normalisation), or its
    dropout is live in training. Callers then fall back to the layer's own ``delta``."""

    def low_rank_factors(self, adapter_name: str) -> LowRankFactors | None:
        """``(A [r, in], B [out, r], scale)`` of ``adapter_name``, or ``None`` (see the class)."""
        ...


class AdapterLayer(nn.Module):
    """Wraps one base layer with any number of adapters of one method."""

    adapter_layer_names: tuple[str, ...] = ()
    """Containers (``nn.ModuleDict`` / ``nn.ParameterDict`` / :class:`~peft_kernel.containers.BufferDict`
    attributes) holding each adapter's tensors: saved and loaded with the adapter. Entries that are
    buffers are frozen tensors of the adapter (never trained)."""
    other_param_names: tuple[str, ...] = ()
    """Plain per-adapter dict attributes (``r``, ``scaling``...), removed with the adapter."""
    shared_tensor_names: tuple[str, ...] = ()
    """Containers among ``adapter_layer_names`` whose entry for an adapter is one tensor shared by
    every layer of that adapter, created by the method's ``peft_kernel_create_shared_tensors`` hook
    and handed to ``update_layer(..., shared=...)`` (VeRA's projections, VB-LoRA's vector bank). Such
    a tensor is saved once, under ``<host>.<container>`` (HF PEFT's ``base_model.vera_A``), not per
    layer, and a load writes it into every layer's entry."""
    status_type_names: dict[str, str] = {}
    """``{base layer kind: class name}`` shown by ``get_layer_status`` as ``<method>.<name>`` where
    HF PEFT's class name is not the base layer's (``{"Linear": "DeloraLinear"}``). The kind is the
    base layer's class name, ``Linear`` for a GPT-2 ``Conv1D``; ``"*"`` stands for every kind
    (``{"*": "LNTuningLayer"}``)."""
    status_type_prefixed: bool = True
    """Whether ``get_layer_status`` prefixes the name with the method (``lora.Linear``); HF PEFT's IA3
    layers show a bare ``Linear``."""
    peft_type: str = ""
    parameter_name: str = ""
    """The parameter of the base module this layer adapts when it is a parameter target
    (:class:`~peft_kernel.parameter_layer.ParameterLayer`); ``""`` for a layer that wraps a forward."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._active_adapters: list[str] = []
        self._disabled = False
        self.merged_adapters: list[str] = []

    # ---- what a method implements ---------------------------------------------------------
    def update_layer(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        """Create the parameters of ``adapter_name`` from ``config``."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """Additive methods: what ``adapter_name`` adds to ``base_layer(x)``. ``None`` means the
        adapter adds nothing on this forward (module dropout in training): it is skipped and gets no
        gradient, which optimizers such as Adam treat differently from a zero gradient."""
        raise NotImplementedError(f"{type(self).__name__} is not additive: override adapted_forward")

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Additive methods: the change to ``base_layer.weight`` (in its own layout) that merging applies."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge: implement delta_weight")

    def delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        """Additive methods: the change to ``base_layer.bias`` on merge, if any."""
        return None

    def hotswap_update(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        """Refresh non-tensor per-adapter values (scalings) after ``hotswap_adapter`` copied new tensors."""

    # ---- bookkeeping (HF PEFT's names) ------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else list(self._active_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disabled

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def adapted_tensor(self) -> torch.Tensor:
        """The base tensor ``delta_weight`` applies to and merges fold into (``base_layer.weight``)."""
        return self.base_layer.weight

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapped layer has (``in_features``, ``batch_first``...) read through, as
        model code often inspects its layers."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def adapter_names(self) -> list[str]:
        """Every adapter this layer holds, in insertion order."""
        names: dict[str, None] = {}
        for attr in self.adapter_layer_names:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    def has_adapter(self, adapter_name: str) -> bool:
        return any(adapter_name in getattr(self, attr) for attr in self.adapter_layer_names)

    def adapter_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    yield item
                elif isinstance(item, nn.Module):
                    yield from item.parameters()

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make ``adapter_names`` active (and trainable); the others inactive and frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._set_trainable(set(names))
        self._active_adapters = [n for n in names if self.has_adapter(n)]

    def freeze_adapters(self) -> None:
        """Every adapter of this layer frozen (``requires_grad=False``); which are active is unchanged."""
        self._set_trainable(set())

    def _set_trainable(self, wanted: set[str]) -> None:
        """The adapters in ``wanted`` trainable, the others frozen: one pass over the containers,
        read from ``_modules`` (no ``Module.__getattr__``), cheap with many adapters and layers."""
        modules = self._modules
        for attr in self.adapter_layer_names:
            container = modules[attr] if attr in modules else getattr(self, attr)
            for name, item in container.items():
                flag = name in wanted
                if isinstance(item, torch.Tensor):  # a parameter, or a buffer (frozen: never made trainable)
                    params: Iterable[Any] = [item] if isinstance(item, nn.Parameter) else []
                elif not item._modules:  # a leaf module (nn.Linear...): its own tensors, no recursion
                    params = [p for p in item._parameters.values() if p is not None]
                else:
                    params = item.parameters()
                for p in params:
                    if p.requires_grad != flag:
                        p.requires_grad_(flag)

    def train(self, mode: bool = True) -> AdapterLayer:
        """``nn.Module.train``, faster with many adapters: the per-adapter leaf modules (plain
        ``nn.Module.train``, no children) get their flag set directly instead of a recursive call."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for child in self._modules.values():
            if child is not None:
                _train_fast(child, mode)
        return self

    def adapter_modules(self, adapter_name: str) -> list[nn.Module]:
        """The modules that belong to ``adapter_name`` alone (its entries in every ModuleDict)."""
        modules = []
        for attr in (*self.adapter_layer_names, *self.other_param_names):
            container = getattr(self, attr)
            if isinstance(container, nn.ModuleDict) and adapter_name in container:
                modules.append(container[adapter_name])
        return modules

    def enable_adapters(self, enabled: bool) -> None:
        self._disabled = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge()
        for attr in (*self.adapter_layer_names, *self.other_param_names):
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self._active_adapters = [a for a in self._active_adapters if a != adapter_name]

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.compiler.is_compiling() and not self._disabled and not self.merged:
            out = self.compiled_forward(x, *args, **kwargs)
            if out is not None:
                return out
        if self._disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        routing = current_routing()
        if routing is not None:
            if self.merged:
                raise MixedBatchError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first.")
            return self.mixed_forward(x, routing, *args, **kwargs)
        mix = current_adapter_mix()
        weights = None if mix is None else mix.weights_for(self)
        if weights is not None:
            if self.merged:
                raise MixedBatchError("per-token adapter weights cannot be applied while adapters are merged; "
                                      "call unmerge_adapter() first.")
            return self.weighted_forward(x, mix.adapters, weights, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self._active_adapters if self.has_adapter(a)]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, active, *args, **kwargs)

    def pad_rank(self, adapter_name: str, target_rank: int) -> bool:
        """Zero-pad ``adapter_name``'s low-rank factors to ``target_rank`` in place, exactly (the
        output does not change; ``prepare_model_for_compiled_hotswap``). ``False``: this layer
        cannot. Raise ``ValueError`` where the adapter's rank is larger."""
        return False

    # ---- torch.compile (see peft_kernel.compiled) -------------------------------------------
    def prepare_compiled(self, order: tuple[str, ...]) -> bool:
        """Runs eagerly before each compiled forward (``order``: the model's adapter names, by
        id): refresh, in place, the tensors :meth:`compiled_forward` reads. ``False``: this layer
        cannot serve the compiled path now, and the model's eager paths run instead."""
        return False

    def compiled_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The forward Dynamo traces: reads the rows' adapter ids
        (:func:`peft_kernel.compiled.compiled_rows`) and tensors only, never adapter names, so that
        switching adapters does not recompile. ``None``: the eager forward runs."""
        return None

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each active adapter's delta (additive methods)."""
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in adapters:
            delta = self.delta(x, name)
            if delta is not None:  # summed in the wider dtype, rounded once at the end (as HF PEFT)
                result = result + delta
        return result.to(dtype)

    def weighted_forward(self, x: torch.Tensor, adapters: Sequence[str], weights: torch.Tensor,
                         *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each held adapter's delta times its per-token weight ``weights[..., i]``
        (additive methods; see :class:`peft_kernel.routing.AdapterMix`)."""
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for i, name in enumerate(adapters):
            if not self.has_adapter(name):
                continue
            delta = self.delta(x, name)
            if delta is not None:
                result = result + delta * weights[..., i, None].to(delta.dtype)
        return result.to(dtype)

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row gets the delta of its own adapter: rows are grouped once per forward and each
        group's delta is computed on its rows only (no masks over the whole batch)."""
        result = self.base_layer(x, *args, **kwargs)
        for name, rows in routing.groups(x.shape[0], x.device).items():
            if not self.has_adapter(name):
                continue
            delta = self.delta(x.index_select(0, rows), name)
            if delta is not None:
                result = result.index_add(0, rows, delta.to(result.dtype))
        return result

    # ---- merge ------------------------------------------------------------------------------
    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        """Fold ``adapter_name`` into the base weights (additive default via ``delta_weight``)."""
        _add_to(self.adapted_tensor(), self.delta_weight(adapter_name), safe_merge, self, adapter_name)
        bias = self.delta_bias(adapter_name)
        if bias is not None:
            _add_to(self.base_layer.bias, bias, safe_merge, self, adapter_name)

    def unmerge_from_base(self, adapter_name: str) -> None:
        """Take ``adapter_name`` back out of the base weights."""
        _add_to(self.adapted_tensor(), -self.delta_weight(adapter_name), False, self, adapter_name)
        bias = self.delta_bias(adapter_name)
        if bias is not None:
            _add_to(self.base_layer.bias, -bias, False, self, adapter_name)

    def fold_adapter(self, adapter_name: str, safe_merge: bool, direction: Literal["merge", "unmerge"]) -> bool:
        """Fold one adapter in (``merge_into_base``) or out (``unmerge_from_base``): the default
        :data:`Fold`, which the core's ``peft_kernel_merge`` implementation also ends in."""
        if direction == "merge":
            self.merge_into_base(adapter_name, safe_merge=safe_merge)
        else:
            self.unmerge_from_base(adapter_name)
        return True

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None, fold: Fold | None = None) -> None:
        """Merge the active (or the given) adapters into the base layer. ``fold`` does the folding
        (the tuner passes the registry's ``merge``, so plugins' merge hooks apply); without it the
        layer folds directly."""
        fold = fold or type(self).fold_adapter
        names = self._active_adapters if adapter_names is None else adapter_names
        if self.merged_adapters:  # HF PEFT's warnings: nothing is folded in twice
            more = [n for n in names if n not in self.merged_adapters]
            if more:
                warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                              f"You are now additionally merging {','.join(more)}.", UserWarning, stacklevel=2)
            else:
                warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=2)
        for name in names:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            fold(self, name, safe_merge, "merge")
            self.merged_adapters.append(name)

    def unmerge(self, fold: Fold | None = None) -> None:
        """Undo every merge, last merged first (``fold`` as for :meth:`merge`)."""
        fold = fold or type(self).fold_adapter
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            fold(self, name, False, "unmerge")

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self._active_adapters}"


def _train_fast(module: nn.Module, mode: bool) -> None:
    if type(module).train is not nn.Module.train:
        module.train(mode)
        return
    module.training = mode
    for child in module._modules.values():
        if child is None:
            continue
        if not child._modules and type(child).train is nn.Module.train:
            if child.training is not mode:
                child.training = mode
        else:
            _train_fast(child, mode)


def _add_to(target: torch.Tensor, delta: torch.Tensor, safe: bool, layer: nn.Module, adapter_name: str) -> None:
    delta = delta.to(device=target.device, dtype=target.dtype)
    if delta.shape != target.shape:
        raise ValueError(
            f"{type(layer).__name__}: adapter {adapter_name!r} delta of shape {tuple(delta.shape)} does not fit "
            f"the base tensor of shape {tuple(target.shape)}"
        )
    with torch.no_grad():
        if safe:
            merged = target + delta
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {adapter_name!r} into {type(layer).__name__}; "
                    "the adapter is broken and the base weights were left untouched."
                )
            target.copy_(merged)
        else:
            target.add_(delta)


def walk_modules(root: nn.Module, stop: tuple[type, ...] = ()) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` in ``named_modules`` order, each module once, without entering adapter
    layers' per-adapter containers (``adapter_layer_names`` / ``other_param_names``) nor modules of
    the ``stop`` types (which are yielded themselves). Its cost does not grow with the number of
    adapters loaded, which matters: it runs on loads and on every mixed-batch forward."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        if path and isinstance(module, stop):
            continue
        skip = (*module.adapter_layer_names, *module.other_param_names) if isinstance(module, AdapterLayer) else ()
        for name, child in reversed(list(module._modules.items())):
            if child is not None and name not in skip:
                stack.append((f"{path}.{name}" if path else name, child))


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer inside ``model`` with its dotted path."""
    return ((path, m) for path, m in walk_modules(model) if isinstance(m, AdapterLayer))