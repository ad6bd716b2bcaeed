"""Entry module of peft-kernel-ia3: registers IA3 and declares its layers. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import ConfigError, MethodRecord, hookimpl
from peft_kernel_ia3.config import IA3Config

# HF PEFT's defaults per transformers ``model_type`` (used when the config leaves them unset).
DEFAULT_TARGET_MODULES = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

DEFAULT_FEEDFORWARD_MODULES = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="IA3",
            config_class=IA3Config,
            prefix="ia3_",
            capabilities={"mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="IA3Model",
            layer_factory="peft_kernel_ia3.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"IA3Layer": "peft_kernel_ia3.layers:IA3Layer"},
        )
    )


@hookimpl
def peft_kernel_prepare_config(config: Any, model: Any) -> None:
    """Resolve ``feedforward_modules=None`` to HF PEFT's per-architecture default."""
    if isinstance(config, IA3Config) and config.feedforward_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = DEFAULT_FEEDFORWARD_MODULES.get(model_type or "")
        if defaults is None:
            raise ConfigError(
                f"Please specify `feedforward_modules` in the IA3Config: there is no default for model_type "
                f"{model_type!r}. Pass feedforward_modules=[...] (a subset of target_modules, possibly empty)."
            )
        config.feedforward_modules = set(defaults)


@hookimpl
def peft_kernel_combine_adapters(config: Any, adapters: Any, configs: Any, weights: Any, combination_type: str,
                                 options: Any) -> Any:
    if not isinstance(config, IA3Config):
        return None
    from peft_kernel_ia3.combine import plan

    return plan(adapters, configs, weights, combination_type, options)
