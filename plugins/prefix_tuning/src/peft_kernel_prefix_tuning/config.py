"""``PrefixTuningConfig``: HF PEFT's fields, names and defaults."""

from __future__ import annotations

from typing import ClassVar, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_WIDTH, ConfigError, PeftType, check_range
from peft_kernel_prompt_learning import PromptLearningConfig

INIT_WEIGHTS = (None, "zero")


@attrs.define(kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of a prefix-tuning adapter (HF PEFT's ``PrefixTuningConfig``).

    ``prefix_projection=True`` trains the prefix through an MLP (``token_dim -> encoder_hidden_size
    -> num_layers * 2 * token_dim``); what is saved is the MLP's output, so a loaded adapter is a
    plain embedding. ``encoder_hidden_size`` defaults to ``token_dim``. ``init_weights="zero"``
    starts the prefix (or the MLP's last layer) at zero.
    """

    prompt_injection: ClassVar[str] = "past_key_values"
    """The prefix is a key/value cache in every attention layer."""

    peft_type: Optional[Union[PeftType, str]] = PeftType.PREFIX_TUNING
    init_weights: Optional[str] = None
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in INIT_WEIGHTS:
            raise ConfigError(
                f"init_weights must be None (random) or 'zero', got {self.init_weights!r}."
            )
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or isinstance(self.encoder_hidden_size, bool)
            or self.encoder_hidden_size < 1
        ):
            raise ConfigError(f"encoder_hidden_size must be a positive int, got {self.encoder_hidden_size!r}.")
        if self.encoder_hidden_size is not None:
            check_range("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size, 1, MAX_WIDTH)
