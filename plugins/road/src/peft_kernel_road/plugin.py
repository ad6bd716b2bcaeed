"""Entry module of peft-kernel-road: the method is a declaration. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_road.config import RoadConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="ROAD",
            config_class=RoadConfig,
            prefix="road_",
            capabilities={"mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="RoadModel",
            layer_factory="peft_kernel_road.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"RoadLayer": "peft_kernel_road.layers:RoadLayer"},
        )
    )
