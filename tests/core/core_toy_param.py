"""An inline toy parameter-target method for the core's tests: ``target_parameters`` on raw
parameters, each adapter adding ``alpha * d`` (``d`` a learned tensor of the parameter's shape)
through the core's :class:`~peft_kernel.parameter_layer.ParameterLayer`."""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch
from core_toy import ToyConfig
from torch import nn

from peft_kernel import hookimpl
from peft_kernel.parameter_layer import ParameterLayer
from peft_kernel.targeting import base_of


@attrs.define(kw_only=True)
class ToyParamConfig(ToyConfig):
    """The toy method with ``target_parameters`` (``init_weights=True``: ``d`` starts at zero)."""

    target_parameters: Optional[list[str]] = None


class ToyParam(ParameterLayer):
    adapter_layer_names = ("toy_d",)
    other_param_names = ("toy_alpha",)

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        self.toy_d = nn.ParameterDict()
        self.toy_alpha: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        shape = getattr(base_of(self), self.parameter_name).shape
        self.toy_d[adapter_name] = nn.Parameter(torch.zeros(shape) if config.init_weights else torch.randn(shape) * 0.1)
        self.toy_alpha[adapter_name] = config.alpha

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.toy_alpha[adapter_name] * self.toy_d[adapter_name]


@hookimpl
def peft_kernel_create_parameter_layer(config: Any, adapter_name: str, base_layer: nn.Module, module_name: str,
                                       parameter_name: str) -> Any:
    if not isinstance(config, ToyParamConfig):
        return None
    layer = ToyParam(base_layer, parameter_name)
    layer.update_layer(adapter_name, config, f"{module_name}.{parameter_name}")
    return layer


class Experts(nn.Module):
    """Two raw parameters used by the module's own forward: ``w_in`` [E, hidden, d], ``w_out`` [E, d, hidden]."""

    def __init__(self, experts: int = 3, d: int = 8, hidden: int = 5) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(experts, hidden, d) * 0.3)
        self.w_out = nn.Parameter(torch.randn(experts, d, hidden) * 0.3)
        self.register_buffer("table", torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.einsum("bd,ehd->beh", x, self.w_in))
        return torch.einsum("beh,edh->bd", hidden, self.w_out) * self.table


class MoeStack(nn.Module):
    """``blocks.<i>.experts`` (raw parameters) and ``blocks.<i>.proj`` (a Linear) in two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"experts": Experts(), "proj": nn.Linear(8, 8)}) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["proj"](block["experts"](x))
        return x


def make_moe(seed: int = 0) -> MoeStack:
    torch.manual_seed(seed)
    return MoeStack().eval()
