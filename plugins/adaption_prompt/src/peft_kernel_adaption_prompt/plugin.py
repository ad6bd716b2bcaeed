"""Entry module of peft-kernel-adaption-prompt: registers Llama-Adapter and chooses its layers.
Cheap to import (no torch)."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import ConfigError, MethodRecord, base_of, hookimpl
from peft_kernel_adaption_prompt.config import AdaptionPromptConfig

# HF PEFT's attention module per transformers ``model_type`` (used when ``target_modules`` is unset).
DEFAULT_TARGET_MODULES = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="ADAPTION_PROMPT",
            config_class=AdaptionPromptConfig,
            prefix="adaption_",
            capabilities={"mixed_batch", "multi_adapter"},
            tuner_name="AdaptionPromptModel",
            layer_factory="peft_kernel_adaption_prompt.layers:make_layer",
            default_target_modules=DEFAULT_TARGET_MODULES,
            exports={"AdaptedAttention": "peft_kernel_adaption_prompt.layers:AdaptedAttention"},
        )
    )


def adapted_modules(config: AdaptionPromptConfig, model: Any) -> list[str]:
    """Paths of the last ``adapter_layers`` modules named ``target_modules`` (the top layers)."""
    named = [path for path, _ in model.named_modules() if path.rsplit(".", 1)[-1] == config.target_modules]
    return named[len(named) - config.adapter_layers:] if config.adapter_layers <= len(named) else named


@hookimpl
def peft_kernel_prepare_config(config: Any, model: Any) -> None:
    """Check, before anything changes, that the model has ``adapter_layers`` adaptable attention
    modules named ``target_modules``."""
    if not isinstance(config, AdaptionPromptConfig):
        return
    from peft_kernel_adaption_prompt.attention import layout

    config.require_sizes()
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ConfigError(f"AdaptionPromptConfig.target_modules is not set and HF PEFT has no default for model_type "
                          f"{model_type!r} (it has {sorted(DEFAULT_TARGET_MODULES)}); name the attention module, "
                          "e.g. target_modules='self_attn'.")
    found = [(path, model.get_submodule(path)) for path in adapted_modules(config, model)]
    if not found:
        raise ConfigError(f"AdaptionPromptConfig.target_modules={config.target_modules!r}: no module of "
                                  f"{type(model).__name__} has that name (it names the attention module of each layer, "
                                  "e.g. 'self_attn' for Llama, 'attn' for GPT-2).")
    if config.adapter_layers > len(found):
        raise ConfigError(f"AdaptionPromptConfig.adapter_layers={config.adapter_layers} is more than the "
                          f"{len(found)} modules named {config.target_modules!r} in {type(model).__name__}.")
    unreadable = [f"{path} ({type(base_of(m)).__name__})" for path, m in found if layout(base_of(m)) is None]
    if unreadable:
        raise ConfigError(f"AdaptionPromptConfig.target_modules={config.target_modules!r} names modules that are no "
                          f"attention adaption prompts can read (q_proj/k_proj/v_proj/o_proj or GPT-2's c_attn, and "
                          f"head_dim): {unreadable[:4]}.")


@hookimpl
def peft_kernel_match_target(config: Any, module_name: str, module: Any, model: Any) -> bool | None:
    """The top ``adapter_layers`` modules named ``target_modules``; nothing else."""
    if not isinstance(config, AdaptionPromptConfig):
        return None
    return module_name in adapted_modules(config, model)
