"""Entry module of peft-kernel-p-tuning: registers the method and builds its encoder. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import MethodRecord, hookimpl
from peft_kernel_p_tuning.config import PromptEncoderConfig
from peft_kernel_prompt_learning import FAMILY_EXPORTS


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="P_TUNING",
            config_class=PromptEncoderConfig,
            prefix="p_tuning_",
            capabilities={"prompt_learning", "mixed_batch", "multi_adapter"},
            exports={
                **FAMILY_EXPORTS,
                "PromptEncoderReparameterizationType": "peft_kernel_p_tuning.config:PromptEncoderReparameterizationType",
                "PromptEncoder": "peft_kernel_p_tuning.encoder:PromptEncoder",
            },
        )
    )


@hookimpl
def peft_kernel_create_prompt_encoder(config: Any, adapter_name: str, model: Any, word_embeddings: Any) -> Any:
    if not isinstance(config, PromptEncoderConfig):
        return None
    from peft_kernel_p_tuning.encoder import PromptEncoder

    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return PromptEncoder(config)
