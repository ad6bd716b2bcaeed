"""Entry module of peft-kernel-prefix-tuning: registers the method and builds its encoder. Cheap to import."""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.plugin_api import MethodRecord, hookimpl
from peft_kernel_prompt_learning import FAMILY_EXPORTS
from peft_kernel_prefix_tuning.config import PrefixTuningConfig


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    register(
        MethodRecord(
            peft_type="PREFIX_TUNING",
            config_class=PrefixTuningConfig,
            prefix="prefix_tuning_",
            capabilities={"prompt_learning", "mixed_batch", "multi_adapter"},
            exports={**FAMILY_EXPORTS, "PrefixEncoder": "peft_kernel_prefix_tuning.encoder:PrefixEncoder"},
        )
    )


@hookimpl
def peft_kernel_create_prompt_encoder(config: Any, adapter_name: str, model: Any, word_embeddings: Any) -> Any:
    if not isinstance(config, PrefixTuningConfig):
        return None
    from peft_kernel_prefix_tuning.encoder import PrefixEncoder

    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return PrefixEncoder(config)
