"""Entry module of peft-kernel-lora-lstm: one hook, ``peft_kernel_create_layer``.

No method is registered: LORA belongs to peft-kernel-lora. This plugin only answers for
``(LoraConfig, nn.LSTM)`` pairs and returns ``None`` for everything else, so LoRA's own
implementation (and any other plugin's) still decides for every other layer.
"""

from __future__ import annotations

from typing import Any

from peft_kernel.markers import hookimpl
from peft_kernel_lora import LoraConfig  # cheap: the config module only, no layer code


@hookimpl
def peft_kernel_create_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
    if not isinstance(config, LoraConfig):
        return None
    from torch import nn

    if not isinstance(base_layer, nn.LSTM):
        return None
    from peft_kernel_lora_lstm.layers import LoraLSTM

    layer = LoraLSTM(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
