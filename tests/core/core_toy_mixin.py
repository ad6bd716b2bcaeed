"""An inline toy method whose record names a ``tuner_mixin``: the generated tuner class
(``ToyMixModel``) gains the mixin's methods. Layers are ``core_toy``'s (the config subclasses its)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import attrs
from core_toy import ToyConfig

from peft_kernel import hookimpl
from peft_kernel.enums import PeftType
from peft_kernel.records import MethodRecord


@attrs.define(kw_only=True)
class ToyMixConfig(ToyConfig):
    peft_type: Optional[Union[PeftType, str]] = "TOYMIX"


class ToyTunerMethods:
    """Methods of the generated tuner: they see the tuner as ``self``."""

    def count_adapter_layers(self: Any, adapter: str = "default") -> int:
        return sum(1 for m in self.model.modules() if hasattr(m, "toy_a") and adapter in m.toy_a)


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(MethodRecord(peft_type="TOYMIX", config_class=ToyMixConfig, prefix="toymix_", tuner_name="ToyMixModel",
                          tuner_mixin="core_toy_mixin:ToyTunerMethods"))
