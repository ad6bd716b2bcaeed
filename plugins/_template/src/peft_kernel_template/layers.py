"""The TEMPLATE layer: additive, so the core derives forward, mixed batches and merging from
``delta`` and ``delta_weight``. Imported on first use only (it imports torch)."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer
from peft_kernel_template.config import TemplateConfig


class TemplateLinear(AdapterLayer):
    adapter_layer_names = ("template_u", "template_v")  # the containers are the checkpoint format
    other_param_names = ("scale",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.template_u, self.template_v = nn.ParameterDict(), nn.ParameterDict()
        self.scale: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: TemplateConfig, module_name: str = "") -> None:
        weight = self.base_layer.weight
        u = torch.zeros(weight.shape[0]) if config.init_weights else torch.randn(weight.shape[0]) * 0.1
        self.template_u[adapter_name] = nn.Parameter(u.to(weight.device, weight.dtype))
        self.template_v[adapter_name] = nn.Parameter(torch.randn(weight.shape[1]).to(weight.device, weight.dtype) * 0.1)
        self.scale[adapter_name] = config.scale

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        u, v = self.template_u[adapter_name], self.template_v[adapter_name]
        return (x.to(v.dtype) @ v).unsqueeze(-1) * u * self.scale[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return torch.outer(self.template_u[adapter_name], self.template_v[adapter_name]) * self.scale[adapter_name]


def make_layer(config: TemplateConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> TemplateLinear | None:
    """The layer for ``base_layer``, or ``None`` for a type this method does not wrap (a named error)."""
    if not isinstance(base_layer, nn.Linear):
        return None
    layer = TemplateLinear(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
