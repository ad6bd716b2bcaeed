"""Entry module of peft-kernel-ln-tuning: the method is a declaration. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import MethodRecord, hookimpl
from peft_kernel_ln_tuning.config import LNTuningConfig
from peft_kernel_ln_tuning.targets import LN_TUNING_TARGET_MODULES


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="LN_TUNING",
            config_class=LNTuningConfig,
            prefix="ln_tuning_",
            capabilities={"mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="LNTuningModel",
            layer_factory="peft_kernel_ln_tuning.layers:make_layer",
            default_target_modules=LN_TUNING_TARGET_MODULES,
        )
    )
