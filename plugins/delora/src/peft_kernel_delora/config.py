"""``DeloraConfig``: HF PEFT's field names, order, defaults and checks.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetedConfig, check_range


@attrs.define(kw_only=True)
class DeloraConfig(TargetedConfig):
    """DeLoRA (https://huggingface.co/papers/2503.18225): each targeted ``nn.Linear`` gains
    ``delta W = (lambda / r) * B diag(1 / (|b_i| |a_i|)) A diag(|W[:, j]|)``, a low-rank update whose
    rank-one components are normalised, so its Frobenius norm is bounded by the learnable
    ``lambda`` (initialised to ``delora_lambda``) times the base weight's column norms."""

    peft_type: Optional[Union[PeftType, str]] = "DELORA"
    r: int = 8
    delora_lambda: Union[int, float] = 15
    module_dropout: float = 0.0
    bias: Literal["none", "all", "delora_only"] = "none"
    init_weights: bool = True  # True: B starts at zero, so the adapter starts as the identity
    rank_pattern: Optional[dict[str, int]] = attrs.field(factory=dict)
    lambda_pattern: Optional[dict[str, Union[int, float]]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_range("DeloraConfig", "r", self.r, 1, MAX_SIZE)
        for key, rank in (self.rank_pattern or {}).items():
            check_range("DeloraConfig", f"rank_pattern[{key!r}]", rank, 1, MAX_SIZE, " (a rank)")
        if not 0.0 <= self.module_dropout <= 1.0:
            raise ConfigError(f"DeloraConfig.module_dropout must be in [0, 1], got {self.module_dropout}")
