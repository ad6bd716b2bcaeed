"""Entry module of peft-kernel-oft: registers OFT and builds its layers. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.markers import hookimpl
from peft_kernel.model_defaults import DEFAULT_TARGET_MODULES
from peft_kernel.records import MethodRecord
from peft_kernel_oft.config import OFTConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="OFT",
            config_class=OFTConfig,
            prefix="oft_",
            capabilities={"mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="OFTModel",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={
                "OFTModel": "peft_kernel_oft.tuner:OFTModel",
                "OFTLayer": "peft_kernel_oft.layers:OFTLayer",
                "OFTRotationModule": "peft_kernel_oft.rotation:OFTRotationModule",
            },
        )
    )


@hookimpl
def peft_kernel_create_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
    if not isinstance(config, OFTConfig):
        return None
    from peft_kernel_oft.layers import make_layer

    return make_layer(config, adapter_name, base_layer, module_name)
