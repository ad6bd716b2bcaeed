"""``PromptTuningConfig``: HF PEFT's fields, names and defaults, with its cross-field rules."""

from __future__ import annotations

import enum
from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import ConfigError, PeftType
from peft_kernel_prompt_learning import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token embeddings start (HF PEFT's ``PromptTuningInit``)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


@attrs.define(kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of a prompt-tuning adapter (HF PEFT's ``PromptTuningConfig``).

    ``prompt_tuning_init``: ``RANDOM`` (normal init), ``SAMPLE_VOCAB`` (embeddings of random
    vocabulary tokens) or ``TEXT`` (embeddings of ``prompt_tuning_init_text`` tokenized with
    ``tokenizer_name_or_path``, cut or repeated to the number of virtual tokens).
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.PROMPT_TUNING
    prompt_tuning_init: Union[PromptTuningInit, str] = PromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.peft_type = PeftType.PROMPT_TUNING
        try:
            self.prompt_tuning_init = PromptTuningInit(str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper())
        except ValueError:
            raise ConfigError(
                f"prompt_tuning_init must be one of {[i.value for i in PromptTuningInit]}, got {self.prompt_tuning_init!r}."
            ) from None
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ConfigError(
                    f"When prompt_tuning_init='{PromptTuningInit.TEXT.value}', tokenizer_name_or_path can't be None."
                )
            if self.prompt_tuning_init_text is None:
                raise ConfigError(
                    f"When prompt_tuning_init='{PromptTuningInit.TEXT.value}', prompt_tuning_init_text can't be None."
                )
        if self.tokenizer_kwargs and self.prompt_tuning_init != PromptTuningInit.TEXT:
            raise ConfigError(
                f"tokenizer_kwargs only valid when using prompt_tuning_init='{PromptTuningInit.TEXT.value}'."
            )
