"""LoRA on raw ``nn.Parameter``s (``target_parameters``): HF PEFT's ``lora.ParamWrapper``.

For a 2-D parameter ``W [out, in]`` the adapter adds ``scaling * B @ A`` as on a Linear layer. For a
3-D parameter ``W [E, out, in]`` (E experts of a mixture-of-experts block, transformers 5 layout)
each expert gets its own rank-``r`` pair, stored as HF PEFT stores them: ``lora_A.weight
[E*r, in]`` expert-major and ``lora_B.weight [out, r*E]`` rank-major, so that
``delta[e] = scaling * B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]``. The module's own
forward then sees ``W + delta`` (see the core's ``ParameterLayer``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import ConfigError, ParameterLayer, base_of
from peft_kernel_lora.config import LoraConfig
from peft_kernel_lora.layers import LoraLayer

SUPPORTED_INITS = (True, False, "gaussian")
"""``init_lora_weights`` values a parameter target takes: the others read or rewrite a layer's
weight as one matrix (PiSSA, OLoRA, LoftQ, CorDA) or its inputs (EVA)."""

LINEAR_VARIANTS = ("kasa_config", "use_bdlora", "arrow_config", "velora_config", "monteclora_config", "lora_ga_config")
"""LoRA variants built for layers with a forward of their own (``None`` when off): refused here."""


class ParamWrapper(LoraLayer, ParameterLayer):
    """LoRA on the parameter ``parameter_name`` of ``base_of(base_layer)`` (2-D or 3-D)."""

    status_type_names = {"*": "ParamWrapper"}

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        param = getattr(base_of(base_layer), parameter_name)
        if param.dim() not in (2, 3):
            raise ConfigError(
                f"lora.ParamWrapper was initialized with {param.dim()} dimensional Parameter, but only 2d and 3d are "
                f"supported (LoraConfig.target_parameters matched {parameter_name!r} of shape {tuple(param.shape)})."
            )
        self.per_expert = param.dim() == 3
        self.num_experts = param.shape[0] if self.per_expert else 1
        self.out_features, self.in_features = param.shape[-2:]

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str = "",
                     shared: dict[str, torch.Tensor] | None = None) -> None:
        refused = {"lora_dropout != 0": config.lora_dropout != 0, "use_dora=True": config.use_dora,
                   "lora_bias=True": config.lora_bias,
                   "alora_invocation_tokens": bool(config.alora_invocation_tokens),
                   **{field: getattr(config, field) is not None for field in LINEAR_VARIANTS},
                   f"init_lora_weights={config.init_lora_weights!r}": config.init_lora_weights not in SUPPORTED_INITS}
        for what, bad in refused.items():
            if bad:
                raise ConfigError(f"lora.ParamWrapper does not work with {what} (LoraConfig.target_parameters "
                                  f"matched {module_name!r}).")
        super().update_layer(adapter_name, config, module_name, shared)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """HF PEFT's answer: a parameter target does not convert (``convert_to_lora`` refuses it)."""
        return False

    def create_adapter(self, adapter_name: str, r: int, config: LoraConfig) -> None:
        rank = r * self.num_experts
        self.lora_A[adapter_name] = nn.Linear(self.in_features, rank, bias=False)
        self.lora_B[adapter_name] = nn.Linear(rank, self.out_features, bias=False)

    def lora_weight(self, adapter_name: str) -> torch.Tensor:
        """``B @ A`` per expert: ``[E, out, in]`` for a 3-D parameter, ``[out, in]`` for a 2-D one."""
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if not self.per_expert:
            return b @ a
        experts, r = self.num_experts, self.r[adapter_name]
        per_expert_a = a.reshape(experts, r, self.in_features)
        per_expert_b = b.reshape(self.out_features, r, experts).permute(2, 0, 1)
        return torch.bmm(per_expert_b, per_expert_a)


def make_parameter_layer(config: LoraConfig, adapter_name: str, base_layer: nn.Module, module_name: str,
                         parameter_name: str) -> Any:
    """The LoRA layer adapting ``<module_name>.<parameter_name>``, holding ``adapter_name``."""
    layer = ParamWrapper(base_layer, parameter_name)
    layer.update_layer(adapter_name, config, f"{module_name}.{parameter_name}")
    return layer
