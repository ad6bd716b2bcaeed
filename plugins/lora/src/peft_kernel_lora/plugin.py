"""Entry module of peft-kernel-lora: registers LoRA and builds its layers. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.markers import hookimpl
from peft_kernel.model_defaults import DEFAULT_TARGET_MODULES
from peft_kernel.records import MethodRecord
from peft_kernel_lora.config import LoraConfig



@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="LORA",
            config_class=LoraConfig,
            prefix="lora_",
            capabilities={"mergeable", "mixed_batch", "hotswap", "multi_adapter"},
            tuner_name="LoraModel",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"LoraModel": "peft_kernel_lora.tuner:LoraModel", "LoraLayer": "peft_kernel_lora.layers:LoraLayer",
                     "convert_to_lora": "peft_kernel_lora.lora_conversion:convert_to_lora",
                     "save_as_lora": "peft_kernel_lora.lora_conversion:save_as_lora",
                     "convert_to_lora_with_errors": "peft_kernel_lora.lora_conversion:convert_to_lora_with_errors"},
        )
    )


@hookimpl
def peft_kernel_create_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
    if not isinstance(config, LoraConfig):
        return None
    from peft_kernel_lora.layers import make_layer

    return make_layer(config, adapter_name, base_layer, module_name)


@hookimpl
def peft_kernel_convert_for_original_base(config: Any, state_dict: Any, initial_state_dict: Any) -> Any:
    if not isinstance(config, LoraConfig):
        return None
    from peft_kernel_lora.conversion import convert_for_original_base

    return convert_for_original_base(config, state_dict, initial_state_dict)


@hookimpl
def peft_kernel_combine_adapters(config: Any, adapters: Any, configs: Any, weights: Any, combination_type: str,
                                 options: Any) -> Any:
    if not isinstance(config, LoraConfig):
        return None
    from peft_kernel_lora.combine import plan

    return plan(adapters, configs, weights, combination_type, options)
