"""Entry module of peft-kernel-prompt-tuning: registers the method and builds its encoder. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import MethodRecord, hookimpl
from peft_kernel_prompt_learning import FAMILY_EXPORTS
from peft_kernel_prompt_tuning.config import PromptTuningConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="PROMPT_TUNING",
            config_class=PromptTuningConfig,
            prefix="prompt_tuning_",
            capabilities={"prompt_learning", "mixed_batch", "multi_adapter"},
            exports={
                **FAMILY_EXPORTS,
                "PromptTuningInit": "peft_kernel_prompt_tuning.config:PromptTuningInit",
                "PromptEmbedding": "peft_kernel_prompt_tuning.encoder:PromptEmbedding",
            },
        )
    )


@hookimpl
def peft_kernel_create_prompt_encoder(config: Any, adapter_name: str, model: Any, word_embeddings: Any) -> Any:
    if not isinstance(config, PromptTuningConfig):
        return None
    from peft_kernel_prompt_tuning.encoder import PromptEmbedding

    return PromptEmbedding(config, word_embeddings)
