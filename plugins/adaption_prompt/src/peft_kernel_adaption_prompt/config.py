"""``AdaptionPromptConfig``: HF PEFT's fields, names and defaults for Llama-Adapter."""

from __future__ import annotations

from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetModulesConfig, check_range


@attrs.define(kw_only=True)
class AdaptionPromptConfig(TargetModulesConfig):
    """Configuration of a Llama-Adapter ("adaption prompt") adapter (HF PEFT's ``AdaptionPromptConfig``).

    The top ``adapter_layers`` attention modules named ``target_modules`` (``"self_attn"`` for Llama
    and Mistral, ``"attn"`` for GPT-2 when left unset) each get a learned prompt of ``adapter_len``
    vectors and a gate, initialised to zero: the attention's output gains ``gate`` times the
    attention of its queries over the prompt's keys and values (computed by the module's own key
    and value projections). ``adapter_len`` and ``adapter_layers`` have no default (as in HF PEFT);
    they must be set when the adapter is added to a model. ``target_modules`` is one module name
    (HF PEFT's type), not a list or a pattern.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.ADAPTION_PROMPT
    exclude_modules: Optional[Union[list[str], set[str], str]] = attrs.field(default=None, init=False)
    modules_to_save: Optional[list[str]] = attrs.field(default=None, init=False)
    """HF PEFT's ``AdaptionPromptConfig`` has neither: not arguments, not in ``to_dict``."""
    adapter_len: Optional[int] = None
    adapter_layers: Optional[int] = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.peft_type = PeftType.ADAPTION_PROMPT
        if self.target_modules is not None and (not isinstance(self.target_modules, str) or not self.target_modules):
            raise ConfigError("AdaptionPromptConfig.target_modules must be the name of the attention module "
                              f"(e.g. 'self_attn'), got {self.target_modules!r}.")
        for field in ("adapter_len", "adapter_layers"):
            if getattr(self, field) is not None:
                check_range("AdaptionPromptConfig", field, getattr(self, field), 1, MAX_SIZE)

    @property
    def is_adaption_prompt(self) -> bool:
        return True

    def require_sizes(self) -> None:
        """Raise :class:`ConfigError` naming ``adapter_len`` / ``adapter_layers`` when one is unset."""
        for field in ("adapter_len", "adapter_layers"):
            if getattr(self, field) is None:
                raise ConfigError(f"AdaptionPromptConfig.{field} must be set (a positive integer) to add the adapter "
                                  "to a model; it has no default.")
