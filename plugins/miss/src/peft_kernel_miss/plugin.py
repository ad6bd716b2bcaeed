"""Entry module of peft-kernel-miss: registers MiSS, and BONE so that old Bone checkpoints load
as MiSS adapters. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_miss.bone import BoneConfig, bone_to_miss_keys
from peft_kernel_miss.config import MissConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="MISS",
            config_class=MissConfig,
            prefix="miss_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="MissModel",
            layer_factory="peft_kernel_miss.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
        )
    )
    # A reader only: a BONE config is built as a MissConfig, so no layer or tuner is ever Bone's.
    register(MethodRecord(peft_type="BONE", config_class=BoneConfig, prefix="bone_"))


@hookimpl
def peft_kernel_map_state_dict(config: Any, state_dict: dict[str, Any], direction: str) -> dict[str, Any] | None:
    """On load, a Bone checkpoint's ``bone_block`` tensors are MiSS's ``miss_block``."""
    if direction != "load" or not isinstance(config, MissConfig):
        return None
    return bone_to_miss_keys(state_dict)
