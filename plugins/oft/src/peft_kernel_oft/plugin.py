"""Entry module of peft-kernel-oft: registers OFT and declares its layers. Cheap to import."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
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
            layer_factory="peft_kernel_oft.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={
                "OFTLayer": "peft_kernel_oft.layers:OFTLayer",
                "OFTRotationModule": "peft_kernel_oft.rotation:OFTRotationModule",
            },
        )
    )
