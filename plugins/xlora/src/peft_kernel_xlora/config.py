"""``XLoraConfig``: HF PEFT's fields, defaults and warnings; values HF accepts but cannot run with
(a depth of 0, a temperature of 0, ``top_k_lora=0``) are refused here.

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

import warnings
from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftConfig, PeftType, check_range

DEFAULT_HIDDEN_SIZE = 4096
"""HF PEFT's value for a config that gives no ``hidden_size`` (with a warning)."""


@attrs.define(kw_only=True)
class XLoraConfig(PeftConfig):
    """A mixture of LoRA experts (X-LoRA): the LoRA adapters saved at ``adapters`` (``{name: path
    or Hub id}``) are loaded as frozen experts, and a classifier on the hidden states of a first
    "scaling pass" of the model gives each token (and with ``layerwise_scalings`` each LoRA layer)
    a weight per expert for the second, real pass.

    ``xlora_depth`` Linear layers (ReLU and ``xlora_dropout_p`` dropout between them, width
    ``xlora_size``) map the last hidden state to the scalings; ``enable_softmax`` turns them into a
    softmax at ``softmax_temperature``; ``top_k_lora`` keeps each token's ``k`` largest (and
    ``enable_softmax_topk`` re-normalises those); ``global_scaling_weight`` multiplies every expert's
    output; ``scaling_pass_value`` is the scaling of every expert during the scaling pass (top-k and
    ``global_scaling_weight`` apply to it too, as in HF PEFT);
    ``use_trainable_adapters`` trains the experts with the classifier.
    """

    peft_type: Optional[Union[PeftType, str]] = "XLORA"
    hidden_size: Optional[int] = None
    adapters: Optional[dict[str, str]] = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: Optional[int] = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.hidden_size is None:
            warnings.warn(f"No value was provided for `hidden_size`. This will be set to {DEFAULT_HIDDEN_SIZE} by "
                          "default, please ensure that this is correct.", stacklevel=3)
            self.hidden_size = DEFAULT_HIDDEN_SIZE
        if self.adapters is None:
            warnings.warn("No value was provided for `adapters`. This will be set to empty, please ensure that this "
                          "is correct.", stacklevel=3)
            self.adapters = {}
        check_range("XLoraConfig", "hidden_size", self.hidden_size, 1, MAX_SIZE)
        check_range("XLoraConfig", "xlora_depth", self.xlora_depth, 1, MAX_SIZE)
        check_range("XLoraConfig", "xlora_size", self.xlora_size, 1, MAX_SIZE)
        if self.top_k_lora is not None:
            check_range("XLoraConfig", "top_k_lora", self.top_k_lora, 1, MAX_SIZE)
        if not 0.0 <= self.xlora_dropout_p < 1.0:
            raise ConfigError(f"XLoraConfig.xlora_dropout_p must be in [0, 1); got {self.xlora_dropout_p}")
        if not self.softmax_temperature > 0:
            raise ConfigError(f"XLoraConfig.softmax_temperature must be > 0; got {self.softmax_temperature}")
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn("`enable_softmax_topk` enabled `top_k_lora` is not set", stacklevel=3)
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn("`enable_softmax_topk` and `enable_softmax` are both enabled. This will result in worse "
                          "performance.", stacklevel=3)
