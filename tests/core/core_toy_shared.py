"""A second inline toy method for the core's tests of model-level shared tensors.

``y = base(x) + scale * (x . p[:in]) * k[:out]`` per adapter, where ``p`` (``toys_proj``, a frozen
buffer drawn from ``seed``) and ``k`` (``toys_bank``, trainable) are one tensor each per adapter,
shared by every layer and sized for the largest targeted layer (as VeRA's projections and VB-LoRA's
vector bank); ``scale`` is each layer's own parameter. ``save_shared=False`` leaves the projection
out of checkpoints (VeRA's ``save_projection``): it is rebuilt from the seed.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import attrs
import torch
from torch import nn

from peft_kernel import hookimpl
from peft_kernel.config import PeftConfig
from peft_kernel.containers import BufferDict
from peft_kernel.enums import PeftType
from peft_kernel.layer import AdapterLayer
from peft_kernel.records import MethodRecord
from peft_kernel.targeting import base_of

PEFT_TYPE = "TOYSHARED"


@attrs.define(kw_only=True)
class ToySharedConfig(PeftConfig):
    peft_type: Optional[Union[PeftType, str]] = PEFT_TYPE
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    seed: int = 0
    save_shared: bool = True


class ToySharedLinear(AdapterLayer):
    adapter_layer_names = ("toys_scale", "toys_bank", "toys_proj")
    shared_tensor_names = ("toys_bank", "toys_proj")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.toys_scale = nn.ParameterDict()
        self.toys_bank = nn.ParameterDict()
        self.toys_proj = BufferDict()

    def update_layer(self, adapter_name: str, config: Any, module_name: str = "", shared: Any = None) -> None:
        self.toys_scale[adapter_name] = nn.Parameter(torch.ones(1))
        self.toys_bank[adapter_name] = shared["toys_bank"]
        self.toys_proj[adapter_name] = shared["toys_proj"]

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        out_features, in_features = self.base_layer.weight.shape
        p = self.toys_proj[adapter_name][:in_features]
        k = self.toys_bank[adapter_name][:out_features]
        return self.toys_scale[adapter_name] * (x @ p).unsqueeze(-1) * k

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        out_features, in_features = self.base_layer.weight.shape
        p = self.toys_proj[adapter_name][:in_features]
        k = self.toys_bank[adapter_name][:out_features]
        return self.toys_scale[adapter_name] * torch.outer(k, p)


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(MethodRecord(
        peft_type=PEFT_TYPE, config_class=ToySharedConfig, prefix="toys_", tuner_name="ToySharedModel",
        capabilities={"mergeable", "mixed_batch", "multi_adapter"},
    ))


@hookimpl
def peft_kernel_create_shared_tensors(config: Any, adapter_name: str, targets: list[tuple[str, nn.Module]]) -> Any:
    if not isinstance(config, ToySharedConfig):
        return None
    out_max = max(base_of(m).weight.shape[0] for _, m in targets)
    in_max = max(base_of(m).weight.shape[1] for _, m in targets)
    generator = torch.Generator().manual_seed(config.seed)
    return {"toys_proj": torch.randn(in_max, generator=generator), "toys_bank": nn.Parameter(torch.zeros(out_max))}


@hookimpl
def peft_kernel_create_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str, shared: Any) -> Any:
    if not isinstance(config, ToySharedConfig) or not isinstance(base_layer, nn.Linear):
        return None
    layer = ToySharedLinear(base_layer)
    layer.update_layer(adapter_name, config, module_name, shared=shared)
    return layer


@hookimpl
def peft_kernel_map_state_dict(config: Any, state_dict: dict[str, torch.Tensor], direction: str) -> Any:
    if not isinstance(config, ToySharedConfig) or direction != "save" or config.save_shared:
        return None
    return {k: v for k, v in state_dict.items() if not k.endswith("toys_proj")}
