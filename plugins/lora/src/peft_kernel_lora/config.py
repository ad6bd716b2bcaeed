"""``LoraConfig`` with every field of HF PEFT's, same names and defaults."""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetedConfig, check_range
from peft_kernel_lora.arrow_config import arrow_settings
from peft_kernel_lora.bdlora_config import check_lora_bdlora
from peft_kernel_lora.corda_config import check_lora_corda
from peft_kernel_lora.eva_config import check_lora_eva
from peft_kernel_lora.kasa_config import check_lora_kasa
from peft_kernel_lora.loftq_config import check_lora_loftq
from peft_kernel_lora.lora_ga_config import check_lora_ga
from peft_kernel_lora.monteclora_config import check_lora_monteclora
from peft_kernel_lora.refusals import explain
from peft_kernel_lora.velora_config import check_lora_velora

INIT_CHOICES = ("gaussian", "pissa", "olora", "loftq", "corda", "eva", "orthogonal", "lora_ga")
"""String values of ``init_lora_weights`` this plugin implements (plus ``pissa_niter_<n>``)."""

# Fields HF PEFT has for features this plugin does not implement yet: any non-default value is
# refused with a clear error when the adapter is injected (the config itself still loads, so
# `peft-kernel inspect` can show it).
UNSUPPORTED_FIELDS = {
    "megatron_config": None,
    "use_qalora": False,
}


@attrs.define(kw_only=True)
class LoraConfig(TargetedConfig):
    """Configuration of a LoRA adapter (HF PEFT's ``LoraConfig``); the targeting fields
    (``target_modules``, ``layers_to_transform``...) come from :class:`TargetedConfig`."""

    peft_type: Optional[Union[PeftType, str]] = PeftType.LORA
    r: int = 8
    lora_alpha: Union[int, float] = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: Optional[dict[str, int]] = attrs.field(factory=dict)
    alpha_pattern: Optional[dict[str, Union[int, float]]] = attrs.field(factory=dict)
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Any] = None
    loftq_config: Union[dict, Any] = attrs.field(factory=dict)
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    use_dora: bool = False
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    layer_replication: Optional[list[list[int]]] = None
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    arrow_config: Optional[Any] = None
    ensure_weight_tying: bool = False
    kasa_config: Optional[Any] = None
    lora_ga_config: Optional[Any] = None
    monteclora_config: Optional[Any] = None
    use_bdlora: Optional[Any] = None
    velora_config: Optional[Any] = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r}")
        check_range("LoraConfig", "r", self.r, 1, MAX_SIZE)
        for key, rank in (self.rank_pattern or {}).items():
            check_range("LoraConfig", f"rank_pattern[{key!r}]", rank, 1, MAX_SIZE, " (a rank)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check_alora(self.alora_invocation_tokens, self.task_type, self.use_dora)
        if self.use_dora and self.lora_bias:
            raise ConfigError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        if isinstance(self.init_lora_weights, str) and not (
            self.init_lora_weights in INIT_CHOICES or self.init_lora_weights.startswith("pissa_niter_")
        ):
            raise ConfigError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r} is not valid; use True, False, "
                f"{', '.join(repr(c) for c in INIT_CHOICES)} or 'pissa_niter_<n>'"
            )
        if self.lora_bias and self.init_lora_weights in ("loftq", "lora_ga"):  # HF refuses every string init; LoftQ here
            raise ConfigError("The argument lora_bias=True is only supported with init_lora_weights=True or False, "
                              f"got init_lora_weights={self.init_lora_weights} instead.")
        self.loftq_config = check_lora_loftq(self.init_lora_weights, self.loftq_config)
        self.corda_config = check_lora_corda(self.init_lora_weights, self.corda_config)
        self.eva_config = check_lora_eva(self.init_lora_weights, self.eva_config)
        self.kasa_config = check_lora_kasa(self)
        self.use_bdlora = check_lora_bdlora(self)
        self.arrow_config = arrow_settings(self.arrow_config)
        self.lora_ga_config = check_lora_ga(self.lora_ga_config)
        self.velora_config = check_lora_velora(self.velora_config, self.use_dora, self.alora_invocation_tokens)
        self.monteclora_config = check_lora_monteclora(self.monteclora_config, {
            "use_dora": self.use_dora, "velora_config": self.velora_config, "alora_invocation_tokens": self.alora_invocation_tokens})

    def rewrites_base_weights(self) -> bool:
        """PiSSA, OLoRA, CorDA and LoRA-GA move part of each targeted weight into the adapter; LoftQ replaces it
        by its quantised version."""
        init = self.init_lora_weights
        return isinstance(init, str) and (init in ("pissa", "olora", "loftq", "corda", "lora_ga") or init.startswith("pissa_niter_"))

    def unsupported(self) -> list[str]:
        """Fields set to values this plugin cannot honour (checked when an adapter is injected)."""
        return [explain(k, f"{k}={getattr(self, k)!r}") for k, default in UNSUPPORTED_FIELDS.items()
                if getattr(self, k) != default]


def check_alora(tokens: Any, task_type: Any, use_dora: bool) -> None:
    """``alora_invocation_tokens``: ``None`` or a list of non-negative token ids (``[]`` is plain
    LoRA, as in HF PEFT, which also warns for task types other than ``CAUSAL_LM``); not with DoRA."""
    if tokens is None:
        return
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (list, tuple)):
        raise ConfigError(f"LoraConfig.alora_invocation_tokens must be a list of token ids, got {tokens!r}")
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ConfigError(f"LoraConfig.alora_invocation_tokens must hold non-negative integer token ids, got {t!r}")
    if tokens and use_dora:
        raise ConfigError("LoraConfig.alora_invocation_tokens cannot be combined with use_dora=True "
                          "(HF PEFT refuses this variant combination too).")
    if tokens and str(getattr(task_type, "value", task_type)) != "CAUSAL_LM":
        warnings.warn("aLoRA is currently only supported for CAUSAL_LM task.", UserWarning, stacklevel=4)

