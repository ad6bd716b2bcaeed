"""Entry module of peft-kernel-template: the method is a declaration. Keep it cheap (no torch)."""

from __future__ import annotations

from typing import Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_template.config import TemplateConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="TEMPLATE",
            config_class=TemplateConfig,
            prefix="template_",
            capabilities={"additive", "mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="TemplateModel",
            layer_factory="peft_kernel_template.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
        )
    )
