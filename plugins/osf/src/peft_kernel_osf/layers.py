"""The OSF layer for ``nn.Linear``: an additive low-rank update of rank ``2 r``.

With the weight's thin SVD split at its preserved rank ``k`` (``W = high + U0 diag(S0) V0``, the
low part's initial factors ``U0``, ``S0``, ``V0`` kept as buffers), an adapter computes with
``high + U_low diag(S_low) V_low``. That is ``W`` plus the update

    ``delta W = U_low diag(S_low) V_low - U0 diag(S0) V0 = B A``
    ``A = [V_low; V0]`` (``[2r, in]``), ``B = [U_low diag(S_low), -U0 diag(S0)]`` (``[out, 2r]``),

exactly HF PEFT's forward. So OSF is a low-rank layer (``low_rank_factors``): fused single-adapter
forward, stacked mixed batches, merge ``W += B A`` and unmerge ``W -= B A`` (HF PEFT refuses to
unmerge). The buffers are not saved: loading an adapter rebuilds them by an SVD of the base weight,
as HF PEFT does. Gradients of ``U_low`` / ``V_low`` are projected orthogonally to the preserved
subspace by a ``Tensor.register_hook`` on the tensor each forward uses (HF PEFT hooks the parameter
itself; hooking the forward's alias survives ``copy.deepcopy`` and parameter replacement too).
Imported on first use only (it imports torch).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, BufferDict, LowRankFactors, UnsupportedFeatureError
from peft_kernel_lowrank import mixed
from peft_kernel_lowrank.derived import DerivedFactors
from peft_kernel_lowrank.forwards import LowRankForwards
from peft_kernel_osf.config import OSFConfig
from peft_kernel_osf.svd import decompose, preserved_rank, project_u, project_v


class OSFLinear(LowRankForwards, AdapterLayer):
    """OSF for ``nn.Linear`` (``get_layer_status`` shows HF PEFT's ``osf.Linear``). Trainable:
    ``osf_svd_params[adapter]`` = ``{U_low [out, r], S_low [r], V_low [r, in]}`` (HF PEFT's keys).
    Frozen, not saved (rebuilt from the base weight): the initial low factors and, where the SVD's
    ``U`` / ``V`` is not square, ``U_high`` / ``V_high`` for the gradient projection."""

    adapter_layer_names = ("osf_svd_params",)
    other_param_names = ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high",
                         "effective_rank")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.out_features, self.in_features = base_layer.weight.shape
        self.osf_svd_params = nn.ModuleDict()
        self._osf_U_low_init = BufferDict(persistent=False)
        self._osf_S_low_init = BufferDict(persistent=False)
        self._osf_V_low_init = BufferDict(persistent=False)
        self._osf_U_high = BufferDict(persistent=False)
        self._osf_V_high = BufferDict(persistent=False)
        self.effective_rank: dict[str, int] = {}
        self._folded = DerivedFactors()

    # ---- creation ---------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: OSFConfig, module_name: str = "") -> None:
        weight = self.base_layer.weight
        rank = preserved_rank(config, module_name, min(weight.shape))
        parts = decompose(weight, rank)
        trainable = {"U_low": parts.U_low, "S_low": parts.S_low, "V_low": parts.V_low}
        if config.init_weights is False:  # HF PEFT's test init: standard normal factors, drawn U, S, V
            trainable = {k: torch.randn(t.shape).to(t.device, t.dtype) for k, t in trainable.items()}
        self.osf_svd_params[adapter_name] = nn.ParameterDict({k: nn.Parameter(t.clone()) for k, t in trainable.items()})
        self._osf_U_low_init[adapter_name] = parts.U_low
        self._osf_S_low_init[adapter_name] = parts.S_low
        self._osf_V_low_init[adapter_name] = parts.V_low
        if parts.U_high is not None:
            self._osf_U_high[adapter_name] = parts.U_high
        if parts.V_high is not None:
            self._osf_V_high[adapter_name] = parts.V_high
        self.effective_rank[adapter_name] = rank

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._folded.drop(adapter_name)
        mixed.drop_stack(self)

    # ---- the update ---------------------------------------------------------------------------
    def _sources(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        params = self.osf_svd_params[adapter_name]
        return (params["U_low"], params["S_low"], params["V_low"], self._osf_U_low_init[adapter_name],
                self._osf_S_low_init[adapter_name], self._osf_V_low_init[adapter_name])

    def _fold(self, adapter_name: str, project: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the class docstring, in HF PEFT's order of operations; with ``project`` the
        gradients reaching ``U_low`` / ``V_low`` through them are projected."""
        u, s, v, u0, s0, v0 = self._sources(adapter_name)
        if u.shape[1] == 0:  # everything preserved: one zero component, so every kernel still runs
            return u.new_zeros(1, self.in_features), u.new_zeros(self.out_features, 1)
        if project:
            u = _projected(u, functools.partial(project_u, high=_held(self._osf_U_high, adapter_name), low=u0))
            v = _projected(v, functools.partial(project_v, high=_held(self._osf_V_high, adapter_name), low=v0))
        b = torch.cat([u * s.unsqueeze(0), -(u0 * s0.unsqueeze(0)).to(u.dtype)], dim=1)
        a = torch.cat([v, v0.to(v.dtype)], dim=0)
        return a, b

    def low_rank_factors(self, adapter_name: str) -> LowRankFactors | None:
        """``(A, B, 1.0)``. Without autograd the folded factors are cached until a source tensor
        changes (same tensor objects, so the stacked kernels' freshness check holds)."""
        if adapter_name not in self.effective_rank:
            return None
        sources = self._sources(adapter_name)
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            a, b = self._fold(adapter_name, project=True)
        else:
            a, b = self._folded.get(adapter_name, sources, lambda: self._fold(adapter_name, project=False))
        return a, b, 1.0

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b, _ = self.low_rank_factors(adapter_name)
        return F.linear(F.linear(x.to(a.dtype), a), b)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b, _ = self.low_rank_factors(adapter_name)
        return b @ a


def _held(container: BufferDict, adapter_name: str) -> torch.Tensor | None:
    return container[adapter_name] if adapter_name in container else None


def _projected(param: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``param`` as this forward uses it, with ``project`` applied to the gradient flowing back into
    it (a hook on a fresh alias, so nothing is left on the parameter itself)."""
    if not param.requires_grad:
        return param
    alias = param.view_as(param)
    alias.register_hook(project)
    return alias


def make_layer(config: OSFConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> OSFLinear:
    """The layer for an ``nn.Linear``. Any other layer type is refused by name: HF PEFT leaves such
    targets (GPT-2's ``Conv1D``, ``nn.Conv2d``, ``nn.Embedding``) silently unadapted, which trains
    nothing there without a word."""
    if not isinstance(base_layer, nn.Linear):
        raise UnsupportedFeatureError(
            f"OSF cannot adapt {module_name!r} of type {type(base_layer).__name__}: it supports nn.Linear layers only "
            "(HF PEFT skips such targets silently, so they would not train). Narrow target_modules to linear layers."
        )
    if not base_layer.weight.is_floating_point():
        raise UnsupportedFeatureError(
            f"OSF cannot adapt {module_name!r}: its weight is {base_layer.weight.dtype} (quantized); OSF needs the "
            "SVD of a float weight."
        )
    layer = OSFLinear(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
