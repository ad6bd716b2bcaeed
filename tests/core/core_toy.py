"""An inline toy method for the core's own tests: a rank-1 delta on ``nn.Linear``.

``y = base(x) + alpha * (x . a) b`` per adapter (``a``: one weight per input feature, ``b``: one per
output feature), i.e. ``delta_weight = alpha * outer(b, a)``. Registered in-process (this module is
the plugin object), so the core's tests need no method plugin installed and a kernel bug cannot hide
behind LoRA. It implements only the additive protocol; the core derives everything else.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Optional, Union

import attrs
import torch
from torch import nn

from peft_kernel import hookimpl
from peft_kernel.config import PeftConfig
from peft_kernel.enums import PeftType
from peft_kernel.layer import AdapterLayer
from peft_kernel.records import MethodRecord

PEFT_TYPE = "TOY"


@attrs.define(kw_only=True)
class ToyConfig(PeftConfig):
    """``alpha`` scales the delta; ``init_weights=True`` starts ``b`` at zero (the identity)."""

    peft_type: Optional[Union[PeftType, str]] = PEFT_TYPE
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    alpha: float = 1.0
    init_weights: bool = True


class ToyLinear(AdapterLayer):
    adapter_layer_names = ("toy_a", "toy_b")
    other_param_names = ("toy_alpha",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.toy_a = nn.ParameterDict()
        self.toy_b = nn.ParameterDict()
        self.toy_alpha: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        out_features, in_features = self.base_layer.weight.shape
        self.toy_a[adapter_name] = nn.Parameter(torch.randn(in_features) * 0.1)
        self.toy_b[adapter_name] = nn.Parameter(torch.zeros(out_features) if config.init_weights else torch.randn(out_features) * 0.1)
        self.toy_alpha[adapter_name] = config.alpha

    def delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.toy_alpha[adapter_name] * (x @ self.toy_a[adapter_name]).unsqueeze(-1) * self.toy_b[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.toy_alpha[adapter_name] * torch.outer(self.toy_b[adapter_name], self.toy_a[adapter_name])

    def hotswap_update(self, adapter_name: str, config: Any, module_name: str = "") -> None:
        self.toy_alpha[adapter_name] = config.alpha


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(MethodRecord(
        peft_type=PEFT_TYPE, config_class=ToyConfig, prefix="toy_", tuner_name="ToyModel",
        capabilities={"mergeable", "mixed_batch", "multi_adapter", "hotswap"},
    ))


@hookimpl
def peft_kernel_create_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
    if not isinstance(config, ToyConfig) or not isinstance(base_layer, nn.Linear):
        return None
    layer = ToyLinear(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer


def raising_plugin() -> types.SimpleNamespace:
    """A second plugin whose ``create_layer`` raises on every call (tryfirst: before the toy's)."""

    @hookimpl(tryfirst=True)
    def peft_kernel_create_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
        raise RuntimeError("boom from the raising toy")

    return types.SimpleNamespace(peft_kernel_create_layer=peft_kernel_create_layer)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.v(torch.relu(self.q(x)))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Stack(nn.Module):
    """Three blocks (``encoder.layers.<i>.q`` / ``.v``, laid out as in transformers models), a
    ``head`` and a ``classifier`` (for ``modules_to_save``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.head(self.encoder(x))))


def make_stack(seed: int = 0) -> Stack:
    """The same weights for the same seed."""
    torch.manual_seed(seed)
    return Stack().eval()


def make_x(rows: int = 6) -> torch.Tensor:
    return torch.linspace(-2, 2, rows * 8).reshape(rows, 8)
