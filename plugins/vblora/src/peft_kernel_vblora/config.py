"""``VBLoRAConfig``: HF PEFT's field names, defaults and checks (clearer where HF's fail late).

No ``from __future__ import annotations``: the core's converter reads these annotations as types.
"""

import math
from typing import Literal, Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, ConfigError, PeftType, TargetedConfig, check_range


@attrs.define(kw_only=True)
class VBLoRAConfig(TargetedConfig):
    """VB-LoRA (https://huggingface.co/papers/2405.15179): each targeted linear layer gains a LoRA
    update ``delta W = B @ A`` whose factors are cut into sub-vectors of ``vector_length``; each
    sub-vector is a softmax mixture of the ``topk`` best-scoring of ``num_vectors`` vectors in a bank
    shared by every layer of the adapter. Trainable: the bank and each layer's mixing logits.
    ``save_only_topk_weights`` saves each sub-vector's top-k indices and weights instead of its
    logits (inference and merging only, as in HF PEFT)."""

    peft_type: Optional[Union[PeftType, str]] = "VBLORA"
    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "vblora_only"] = "none"
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_range("VBLoRAConfig", "r", self.r, 1, MAX_SIZE)
        check_range("VBLoRAConfig", "num_vectors", self.num_vectors, 1, MAX_SIZE)
        check_range("VBLoRAConfig", "vector_length", self.vector_length, 1, MAX_SIZE)
        check_range("VBLoRAConfig", "topk", self.topk, 1, self.num_vectors, " (topk picks among num_vectors vectors)")
        if not 0.0 <= self.vblora_dropout <= 1.0:
            raise ConfigError(f"VBLoRAConfig.vblora_dropout must be in [0, 1], got {self.vblora_dropout}")
        for name in ("init_vector_bank_bound", "init_logits_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"VBLoRAConfig.{name} must be a finite number >= 0, got {value}")
