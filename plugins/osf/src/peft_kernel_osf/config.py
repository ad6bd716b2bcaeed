"""``OSFConfig``: HF PEFT's field names, types and defaults, with checks at construction.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
``target_modules`` and ``modules_to_save`` come from :class:`TargetModulesConfig`; like HF PEFT's,
the config has no ``exclude_modules``, ``layers_to_transform`` or ``layers_pattern``.
"""

from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetModulesConfig


@attrs.define(kw_only=True)
class OSFConfig(TargetModulesConfig):
    """Orthogonal Subspace Fine-tuning (https://huggingface.co/papers/2504.07097): each targeted
    ``nn.Linear`` weight is split by SVD into its top ``effective_rank`` singular directions (frozen,
    "high") and the rest (trainable ``U_low``, ``S_low``, ``V_low``); gradients of ``U_low`` / ``V_low``
    are projected orthogonally to the high subspace.

    ``effective_rank`` is the *preserved* (frozen) rank: an int, a float in (0, 1] (that fraction of
    ``min(weight.shape)``, rounded down), or ``None`` for half of ``min(weight.shape)``. A value above
    ``min(weight.shape)`` preserves everything (nothing trains there), as in HF PEFT.
    ``rank_pattern`` overrides it per module: the first key (a regex) *found anywhere* in the module's
    name wins (HF PEFT's ``re.search`` rule for OSF, unlike LoRA's end-of-name rule).
    ``target_svd_config`` is kept for HF PEFT's format only: HF PEFT 0.21.2 does not read it either.

    ``target_modules=None`` targets every linear layer but the output layer, for any model (HF
    PEFT's default for OSF). Only ``nn.Linear`` is supported: other targets (GPT-2's ``Conv1D``,
    convolutions, embeddings), which HF PEFT leaves unadapted without a word, are refused by name.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.OSF
    exclude_modules: Optional[Union[list[str], set[str], str]] = attrs.field(default=None, init=False)
    """HF PEFT's ``OSFConfig`` has no ``exclude_modules``: not an argument, not in ``to_dict`` (so
    HF's ``OSFConfig(**our_dict)`` works), and dropped with a warning when a file carries it."""
    effective_rank: Optional[Union[int, float]] = None
    rank_pattern: Optional[dict[str, Union[int, float]]] = None
    init_weights: Optional[bool] = True  # False: random U_low, S_low, V_low (tests); True / None: the SVD
    target_svd_config: Optional[dict[str, int]] = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # types and the rank_pattern keys' regexes are checked there
        check_preserved_rank("effective_rank", self.effective_rank)
        for key, value in (self.rank_pattern or {}).items():
            check_preserved_rank(f"rank_pattern[{key!r}]", value)


def check_preserved_rank(field: str, value: Union[int, float, None]) -> None:
    """A preserved rank is ``None``, a positive int, a float in (0, 1] (a fraction of the smaller
    weight dimension) or a whole float above 1 (HF PEFT reads ``2.0`` as 2)."""
    if value is None:
        return
    if isinstance(value, float):
        if not (0.0 < value <= 1.0 or (1.0 < value <= MAX_SIZE and value.is_integer())):
            raise ConfigError(
                f"OSFConfig.{field} must be a positive int, a fraction in (0, 1] of the smaller weight "
                f"dimension, or None (half of it); got {value!r}"
            )
    elif not 1 <= value <= MAX_SIZE:
        raise ConfigError(f"OSFConfig.{field} (the preserved rank) must be in [1, {MAX_SIZE}], got {value!r}")
