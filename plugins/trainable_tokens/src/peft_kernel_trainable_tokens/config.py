"""``TrainableTokensConfig``: HF PEFT's fields, defaults and checks.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import ConfigError, PeftType, TargetModulesConfig


@attrs.define(kw_only=True)
class TrainableTokensConfig(TargetModulesConfig):
    """Trainable Tokens: only the embedding rows of ``token_indices`` train (new or rarely seen
    tokens), stored as their new values (``trainable_tokens_delta``) while the embedding stays
    frozen. ``target_modules`` names the embedding (default: the model's input embedding); a
    tied output embedding (``lm_head``) uses the same rows, as in HF PEFT."""

    peft_type: Optional[Union[PeftType, str]] = "TRAINABLE_TOKENS"
    token_indices: list[int] = attrs.field(metadata={"example": [0, 1]})
    init_weights: bool = True
    exclude_modules: Optional[Union[list[str], set[str], str]] = attrs.field(default=None, init=False)
    modules_to_save: Optional[list[str]] = attrs.field(default=None, init=False)
    """HF PEFT's ``TrainableTokensConfig`` has neither: not arguments, not saved."""  # True: the rows start as the embedding's own values (the identity)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        indices = self.token_indices
        if not isinstance(indices, (list, tuple)) or not indices:
            raise ConfigError(f"TrainableTokensConfig.token_indices must be a non-empty list of token ids, got {indices!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
            raise ConfigError(f"TrainableTokensConfig.token_indices must hold non-negative int token ids, got {indices!r}")
        if len(set(indices)) != len(indices):
            raise ConfigError(f"TrainableTokensConfig.token_indices has duplicates: {indices!r}")
        self.token_indices = list(indices)
