"""Entry module of peft-kernel-multitask-prompt-tuning: registers the method and builds its encoder. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import MethodRecord, hookimpl
from peft_kernel_multitask_prompt_tuning.config import MultitaskPromptTuningConfig
from peft_kernel_prompt_learning import FAMILY_EXPORTS


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="MULTITASK_PROMPT_TUNING",
            config_class=MultitaskPromptTuningConfig,
            prefix="multitask_prompt_tuning_",
            capabilities={"prompt_learning", "mixed_batch", "multi_adapter"},
            exports={
                **FAMILY_EXPORTS,
                "MultitaskPromptTuningInit": "peft_kernel_multitask_prompt_tuning.config:MultitaskPromptTuningInit",
                "MultitaskPromptEmbedding": "peft_kernel_multitask_prompt_tuning.encoder:MultitaskPromptEmbedding",
            },
        )
    )


@hookimpl
def peft_kernel_create_prompt_encoder(config: Any, adapter_name: str, model: Any, word_embeddings: Any) -> Any:
    if not isinstance(config, MultitaskPromptTuningConfig):
        return None
    from peft_kernel_multitask_prompt_tuning.encoder import MultitaskPromptEmbedding

    return MultitaskPromptEmbedding(config, word_embeddings)
