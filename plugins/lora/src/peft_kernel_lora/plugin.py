"""Entry module of peft-kernel-lora: registers LoRA and declares its layers. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import DEFAULT_TARGET_MODULES, MethodRecord, hookimpl
from peft_kernel_lora.config import LoraConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="LORA",
            config_class=LoraConfig,
            prefix="lora_",
            capabilities={"additive", "mergeable", "mixed_batch", "hotswap", "multi_adapter"},
            call_keywords={"alora_offsets"},
            tuner_name="LoraModel",
            tuner_mixin="peft_kernel_lora.tuner:LoraTuner",
            layer_factory="peft_kernel_lora.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"LoraLayer": "peft_kernel_lora.layers:LoraLayer",
                     "convert_to_lora": "peft_kernel_lora.lora_conversion:convert_to_lora",
                     "save_as_lora": "peft_kernel_lora.lora_conversion:save_as_lora",
                     "convert_to_lora_with_errors": "peft_kernel_lora.lora_conversion:convert_to_lora_with_errors",
                     "LoftQConfig": "peft_kernel_lora.loftq_config:LoftQConfig",
                     "CordaConfig": "peft_kernel_lora.corda_config:CordaConfig",
                     "preprocess_corda": "peft_kernel_lora.corda:preprocess_corda",
                     "replace_lora_weights_loftq": "peft_kernel_lora.loftq:replace_lora_weights_loftq",
                     "LoraGAConfig": "peft_kernel_lora.lora_ga_config:LoraGAConfig",
                     "preprocess_loraga": "peft_kernel_lora.lora_ga:preprocess_loraga",
                     "VeloraConfig": "peft_kernel_lora.velora_config:VeloraConfig",
                     "MontecloraConfig": "peft_kernel_lora.monteclora_config:MontecloraConfig",
                     "EvaConfig": "peft_kernel_lora.eva_config:EvaConfig",
                     "ArrowConfig": "peft_kernel_lora.arrow_config:ArrowConfig",
                     "create_arrow_model": "peft_kernel_lora.arrow_model:create_arrow_model",
                     "initialize_lora_eva_weights": "peft_kernel_lora.eva:initialize_lora_eva_weights",
                     "get_eva_state_dict": "peft_kernel_lora.eva:get_eva_state_dict",
                     "KasaConfig": "peft_kernel_lora.kasa_config:KasaConfig",
                     "BdLoraConfig": "peft_kernel_lora.bdlora_config:BdLoraConfig"},
        )
    )


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


@hookimpl
def peft_kernel_match_target(config: Any, module_name: str, module: Any, model: Any) -> bool | None:
    """``trainable_token_indices``: the embeddings that get token rows (else the standard rule)."""
    if not isinstance(config, LoraConfig) or not config.trainable_token_indices:
        return None
    from peft_kernel_lora.tokens import match

    return match(config, module_name, module, model)


@hookimpl
def peft_kernel_create_parameter_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str,
                                       parameter_name: str) -> Any:
    """``target_parameters``: LoRA on a raw parameter (see :mod:`peft_kernel_lora.parameters`)."""
    if not isinstance(config, LoraConfig):
        return None
    from peft_kernel_lora.parameters import make_parameter_layer

    return make_parameter_layer(config, adapter_name, base_layer, module_name, parameter_name)


@hookimpl
def peft_kernel_create_shared_tensors(config: Any, adapter_name: str, targets: Any) -> Any:
    if not isinstance(config, LoraConfig) or not config.trainable_token_indices:
        return None
    from peft_kernel_lora.tokens import shared_rows

    return shared_rows(config, targets)


@hookimpl
def peft_kernel_map_state_dict(config: Any, state_dict: Any, direction: str) -> Any:
    if not isinstance(config, LoraConfig):
        return None
    from peft_kernel_lora.tokens import map_state_dict

    return map_state_dict(state_dict, direction)


@hookimpl
def peft_kernel_release_config(config: Any, model: Any, remaining: Any) -> None:
    """aLoRA: the model stops looking for invocation sequences when its last aLoRA adapter leaves."""
    if not isinstance(config, LoraConfig) or not config.alora_invocation_tokens:
        return
    if not any(isinstance(c, LoraConfig) and c.alora_invocation_tokens for c in remaining):
        from peft_kernel_lora.alora import uninstall

        uninstall(model)


@hookimpl
def peft_kernel_prepare_config(config: Any, model: Any) -> None:
    """``layer_replication``: rebuild the layer stack before targets are matched; aLoRA: find the
    invocation sequences once per forward of the model; KaSA: not mixed with other LoRA adapters;
    ``ensure_weight_tying``: every tied layer named."""
    if isinstance(config, LoraConfig) and config.alora_invocation_tokens:
        from peft_kernel_lora.alora import install

        install(model)
    if isinstance(config, LoraConfig):
        from peft_kernel_lora.kasa import check_model
        from peft_kernel_lora.weight_tying import prepare

        check_model(model, config)
        prepare(config, model)
    if isinstance(config, LoraConfig) and config.layer_replication:
        from peft_kernel_lora.replication import replicate

        replicate(model, config.layer_replication)


@hookimpl
def peft_kernel_adapter_injected(config: Any, model: Any, adapter_name: str) -> None:
    """``ensure_weight_tying``: the adapters on tied layers share their tensors."""
    if isinstance(config, LoraConfig) and config.ensure_weight_tying:
        from peft_kernel_lora.weight_tying import tie

        tie(model, adapter_name, config)
