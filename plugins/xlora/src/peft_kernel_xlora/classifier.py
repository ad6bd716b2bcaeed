"""The X-LoRA gate: hidden states to per-token, per-layer expert scalings (HF PEFT's module layout,
so its state-dict keys are ``internal_xlora_classifier.layers.<i>.weight`` / ``.bias``)."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel_xlora.config import XLoraConfig


class TemperatureScaledSoftmax(nn.Module):
    """``softmax(x / temperature)`` over the last dim."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.softmax(logits / self.temperature)


class XLoraClassifier(nn.Module):
    """``xlora_depth`` Linear layers (ReLU and, when ``xlora_dropout_p > 0``, dropout between them) from ``hidden_size`` to one
    logit per expert (per expert and LoRA layer with ``layerwise_scalings``)."""

    def __init__(self, config: XLoraConfig, n_classes: int, n_layers: int) -> None:
        super().__init__()
        self.config = config
        self.n_classes, self.n_layers = n_classes, n_layers
        self.softmax = TemperatureScaledSoftmax(config.softmax_temperature)
        out = n_classes * n_layers if config.layerwise_scalings else n_classes
        widths = [config.hidden_size] + [config.xlora_size] * (config.xlora_depth - 1) + [out]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
            if i:  # HF PEFT's layout: no Dropout module when the probability is 0
                layers += [nn.ReLU()] + ([nn.Dropout(p=config.xlora_dropout_p)] if config.xlora_dropout_p > 0 else [])
            layers.append(nn.Linear(fan_in, fan_out, bias=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, hidden]`` to the scalings ``[batch, seq, n_layers, n_classes]``."""
        logits = self.layers(hidden_states.to(self.layers[0].weight.dtype))
        batch, seq = hidden_states.shape[:2]
        if self.config.layerwise_scalings:
            scalings = logits.reshape(batch, seq, self.n_layers, self.n_classes)
        else:
            scalings = logits.unsqueeze(2).expand(batch, seq, self.n_layers, self.n_classes)
        if self.config.enable_softmax:
            scalings = self.softmax(scalings)
        return scalings


def expert_weights(scalings: torch.Tensor, config: XLoraConfig) -> torch.Tensor:
    """The weight each LoRA layer gives each expert, from the classifier's scalings (last dim: the
    experts): ``top_k_lora`` keeps each token's ``k`` largest, ``enable_softmax_topk`` takes the
    softmax of the non-zero ones among them, and every weight is multiplied by ``global_scaling_weight``."""
    weights = scalings
    if config.top_k_lora is not None:
        k = min(config.top_k_lora, weights.shape[-1])
        keep = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, weights.topk(k, dim=-1).indices, True)
        weights = weights * keep
        if config.enable_softmax_topk:  # over each token's non-zero weights (none: zeros, as HF PEFT)
            nonzero = weights != 0
            soft = torch.softmax(weights.masked_fill(~nonzero, float("-inf")), dim=-1)
            weights = torch.where(nonzero, soft, torch.zeros_like(soft))
    return weights * config.global_scaling_weight
