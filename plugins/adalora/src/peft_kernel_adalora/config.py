"""``AdaLoraConfig``: HF PEFT's field names, order, defaults and checks (HF's class extends its
``LoraConfig``, so the LoRA fields are here too; those AdaLoRA does not use keep their defaults).

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

import warnings
from typing import Any, Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetedConfig, check_range

FACTORS = ("lora_A", "lora_B", "lora_E")
"""The saved tensors of an AdaLoRA layer: ``Q`` ``[r, in]``, ``P`` ``[out, r]``, ``Λ`` ``[r, 1]``."""

UNSUPPORTED_FIELDS = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "monteclora_config": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
    "ensure_weight_tying": False,
}
"""LoRA fields of HF's config for features AdaLoRA (here) does not have: other values are refused."""


@attrs.define(kw_only=True)
class AdaLoraConfig(TargetedConfig):
    """AdaLoRA (https://openreview.net/forum?id=lq62uWRJjiY): each targeted layer gains the SVD-form
    update ``delta W = B diag(E) A * lora_alpha / ranknum`` of rank ``init_r``. During training,
    ``update_and_allocate(global_step)`` scores every singular triplet (EMA of sensitivity times its
    uncertainty) and masks the least important entries of ``E`` until, after ``total_step - tfinal``
    steps, ``target_r`` triplets per layer remain on average; the final mask is ``rank_pattern``."""

    peft_type: Optional[Union[PeftType, str]] = "ADALORA"
    r: int = 8
    lora_alpha: Union[int, float] = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: Optional[dict[str, list[bool]]] = None
    alpha_pattern: Optional[dict[str, Union[int, float]]] = attrs.field(factory=dict)
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Any] = None
    loftq_config: Union[dict, Any] = attrs.field(factory=dict)
    eva_config: Optional[Any] = None
    corda_config: Optional[Any] = None
    lora_ga_config: Optional[Any] = None
    use_dora: bool = False
    velora_config: Optional[Any] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[Any] = None
    layer_replication: Optional[list[list[int]]] = None
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    use_bdlora: Optional[Any] = None
    arrow_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    ensure_weight_tying: bool = False
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = attrs.field(default=None, metadata={"example": 100})

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.use_dora:
            raise ConfigError("AdaLoraConfig.use_dora: AdaLoRA does not support DoRA (use_dora=False).")
        if self.loftq_config:
            raise ConfigError("AdaLoraConfig.loftq_config: AdaLoRA does not support LOFTQ.")
        if self.init_lora_weights not in (True, False):
            raise ConfigError(f"AdaLoraConfig.init_lora_weights must be True or False for AdaLoRA, got "
                              f"{self.init_lora_weights!r}")
        for name, default in UNSUPPORTED_FIELDS.items():
            if getattr(self, name) != default:
                raise ConfigError(f"AdaLoraConfig.{name}={getattr(self, name)!r} is not supported by AdaLoRA; "
                                  f"leave it at {default!r}.")
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError("AdaLoraConfig.total_step: AdaLoRA does not work when `total_step` is None, supply a "
                              f"value > 0 (got {self.total_step!r}).")
        check_range("AdaLoraConfig", "total_step", self.total_step, 1, 2**62)
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or "
                f"increase `total_step` (AdaLoraConfig: tinit={self.tinit}, tfinal={self.tfinal}, "
                f"total_step={self.total_step}; tinit must be < total_step - tfinal)."
            )
        check_range("AdaLoraConfig", "init_r", self.init_r, 1, MAX_SIZE)
        check_range("AdaLoraConfig", "target_r", self.target_r, 0, MAX_SIZE)
        check_range("AdaLoraConfig", "deltaT", self.deltaT, 1, 2**62)
        check_range("AdaLoraConfig", "tinit", self.tinit, 0, 2**62)
        check_range("AdaLoraConfig", "tfinal", self.tfinal, 0, 2**62)
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"AdaLoraConfig.{field} must be in (0, 1) (an EMA coefficient), got {value}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"AdaLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for key, mask in (self.rank_pattern or {}).items():
            if not all(isinstance(kept, bool) for kept in mask):
                raise ConfigError(f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of booleans (the kept "
                                  "singular values of that layer)")
        if self.r != 8:
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored. If you intended to set the "
                          "initial rank, use `init_r` instead.", UserWarning, stacklevel=3)
