"""``MultitaskPromptTuningConfig``: HF PEFT's fields, names, defaults and ``MultitaskPromptTuningInit``."""

from __future__ import annotations

import enum
from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, check_range
from peft_kernel_prompt_learning import PromptLearningConfig


class MultitaskPromptTuningInit(str, enum.Enum):
    """How the shared prompt and the task factors start (HF PEFT's ``MultitaskPromptTuningInit``)."""

    TEXT = "TEXT"
    """The shared prompt from the embeddings of ``prompt_tuning_init_text``; random task factors."""
    RANDOM = "RANDOM"
    """Everything random."""
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    """The source checkpoint's shared prompt and its task factors averaged over its tasks."""
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    """The source checkpoint's shared prompt and the factors of its task ``prompt_tuning_init_task``."""
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"
    """The source checkpoint's shared prompt; random task factors."""

    def __str__(self) -> str:
        return self.value


SOURCE_INITS = (MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS, MultitaskPromptTuningInit.EXACT_SOURCE_TASK,
                MultitaskPromptTuningInit.ONLY_SOURCE_SHARED)
"""Inits that read ``prompt_tuning_init_state_dict_path``."""

COLLAPSING_INITS = (MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS, MultitaskPromptTuningInit.EXACT_SOURCE_TASK)
"""Inits whose task factors come from the source as one task (so ``num_tasks`` must be 1, as in HF PEFT)."""


@attrs.define(kw_only=True)
class MultitaskPromptTuningConfig(PromptLearningConfig):
    """Configuration of a multitask prompt-tuning adapter (HF PEFT's ``MultitaskPromptTuningConfig``).

    The virtual tokens of a row with task ``t`` are the shared prompt ``[n, token_dim]`` multiplied
    elementwise by the rank-``num_ranks`` matrix ``prefix_task_cols[t] @ prefix_task_rows[t]``;
    ``forward`` and ``generate`` take ``task_ids`` (one per row, each in ``[0, num_tasks)``). On an
    encoder-decoder (``SEQ_2_SEQ_LM``, ``num_transformer_submodules=2``) there are ``2n`` tokens: the
    first ``n`` in front of the encoder's inputs, the last ``n`` in front of the decoder's.

    ``prompt_tuning_init``: ``RANDOM``, ``TEXT`` (as prompt tuning's), or from a source checkpoint
    (``prompt_tuning_init_state_dict_path``, a ``.safetensors`` file or a torch state dict of a
    multitask prompt-tuning adapter): ``AVERAGE_SOURCE_TASKS``, ``EXACT_SOURCE_TASK`` (task
    ``prompt_tuning_init_task``) or ``ONLY_SOURCE_SHARED``. The source is read only when a trainable
    adapter is created, not when a saved adapter is loaded.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.MULTITASK_PROMPT_TUNING
    prompt_tuning_init: Union[MultitaskPromptTuningInit, str] = MultitaskPromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    prompt_tuning_init_state_dict_path: Optional[str] = None
    prompt_tuning_init_task: Optional[int] = 0
    num_ranks: Optional[int] = 1
    num_tasks: Optional[int] = 1

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.peft_type = PeftType.MULTITASK_PROMPT_TUNING
        owner = "MultitaskPromptTuningConfig"
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        try:
            self.prompt_tuning_init = init = MultitaskPromptTuningInit(str(init).upper())
        except ValueError:
            raise ConfigError(f"{owner}.prompt_tuning_init must be one of "
                              f"{[i.value for i in MultitaskPromptTuningInit]}, got {init!r}.") from None
        check_range(owner, "num_tasks", self.num_tasks, 1, MAX_SIZE)
        check_range(owner, "num_ranks", self.num_ranks, 1, MAX_SIZE)
        check_range(owner, "prompt_tuning_init_task", self.prompt_tuning_init_task, 0, MAX_SIZE)
        if init == MultitaskPromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ConfigError(f"When prompt_tuning_init='{init.value}', tokenizer_name_or_path can't be None.")
            if self.prompt_tuning_init_text is None:
                raise ConfigError(f"When prompt_tuning_init='{init.value}', prompt_tuning_init_text can't be None.")
        if self.tokenizer_kwargs and init != MultitaskPromptTuningInit.TEXT:
            raise ConfigError(f"tokenizer_kwargs only valid when using prompt_tuning_init='{MultitaskPromptTuningInit.TEXT.value}'.")
        if self.inference_mode or init not in SOURCE_INITS:
            return  # a loaded adapter's weights come from its checkpoint, not from the source
        if not self.prompt_tuning_init_state_dict_path:
            raise ConfigError(f"{owner}.prompt_tuning_init_state_dict_path needs to be specified with {init.value} init method.")
        if init in COLLAPSING_INITS and self.num_tasks != 1:
            raise ConfigError(
                f"{owner}.num_tasks must be 1 with prompt_tuning_init={init.value}: the source's task factors become "
                f"one task (got num_tasks={self.num_tasks}); use ONLY_SOURCE_SHARED to start several tasks."
            )
