"""``AdaptedAttention``: an attention module with Llama-Adapter prompts, any number of adapters.

The wrapped attention runs unchanged; each active adapter adds ``gate * softmax(q k_p^T / sqrt(d)) v_p``
(float32 softmax), where ``q`` are the module's own queries for the hidden states and ``k_p`` / ``v_p``
its keys and values of the adapter's prompt, projected as :mod:`peft_kernel_adaption_prompt.attention`
describes. Mixed batches stack the adapters' prompts once per forward and give each row its
adapter's keys, values and gate by indexing (rows of the base model get a zero gate): no loop over
rows, one batched prompt attention per layer.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, Routing, UnsupportedFeatureError, current_routing
from peft_kernel_adaption_prompt import attention
from peft_kernel_adaption_prompt.config import AdaptionPromptConfig


def prompt_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``q [b, h, s, d]`` over prompt ``keys`` / ``values [n, h, L, d]`` (``n`` is 1 or ``b``), scaled by
    ``gates [n]``; ``key_mask [n, L]`` (True: a real prompt position) for padded prompts.
    Returns ``[b, s, h * d]``."""
    batch, heads, seq, dim = q.shape
    scores = q @ keys.transpose(2, 3) / math.sqrt(dim)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = gates.to(q.dtype).view(-1, 1, 1, 1) * torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (weights @ values).transpose(1, 2).reshape(batch, seq, heads * dim)


class AdaptedAttention(AdapterLayer):
    """Llama-Adapter around one attention module (HF PEFT's ``AdaptedAttention``)."""

    adapter_layer_names = ("adaption_prompt", "adaption_gate")
    peft_type = "ADAPTION_PROMPT"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: AdaptionPromptConfig, module_name: str = "") -> None:
        """A prompt ``[1, adapter_len, hidden]`` drawn from N(0, 1) and a zero gate ``[1]`` (HF PEFT's
        shapes): a new adapter leaves the model's outputs unchanged until its gate is trained."""
        reference = next(self.base_layer.parameters())
        like = {"device": reference.device, "dtype": reference.dtype}
        width = attention.hidden_size(self.base_layer)
        self.adaption_prompt[adapter_name] = nn.Parameter(torch.empty(1, config.adapter_len, width, **like).normal_())
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, **like))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routing = current_routing()
        active = [a for a in self._active_adapters if self.has_adapter(a)]
        if self._disabled or (routing is None and not active):
            return self.base_layer(*args, **kwargs)
        if routing is not None:
            return attention.run_with_prompt_term(self.base_layer, args, kwargs, lambda q: self._mixed(q, routing))
        return attention.run_with_prompt_term(self.base_layer, args, kwargs,
                                              lambda q: sum(self._single(q, name) for name in active))

    def _single(self, q: torch.Tensor, name: str) -> torch.Tensor:
        keys, values = attention.prompt_keys_values(self.base_layer, self.adaption_prompt[name].to(q.dtype), q.shape[1])
        return prompt_attention(q, keys, values, self.adaption_gate[name])

    def _mixed(self, q: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Every row with its own adapter's prompt and gate; prompts of different lengths are padded
        and the padding masked out of the softmax."""
        order = tuple(self.adapter_names())
        slots = routing.slots(q.shape[0], q.device, order)
        prompts = [self.adaption_prompt[name][0] for name in order]
        lengths = torch.tensor([p.shape[0] for p in prompts], device=q.device)
        stacked = nn.utils.rnn.pad_sequence(prompts, batch_first=True).to(q.dtype)
        key_mask = torch.arange(stacked.shape[1], device=q.device) < lengths[:, None]
        keys, values = attention.prompt_keys_values(self.base_layer, stacked, q.shape[1])
        gates = torch.cat([*(self.adaption_gate[name] for name in order), self.adaption_gate[order[0]].new_zeros(1)])
        rows = slots.clamp(min=0)  # rows of the base model (slot -1) read the appended zero gate
        return prompt_attention(q, keys[rows], values[rows], gates[slots], key_mask[rows])

    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        raise UnsupportedFeatureError(
            "adaption prompt (Llama-Adapter) adapters cannot be merged into the base weights: the prompt attention is "
            "no change of any weight. Use unload() to remove the adapters, or keep the PeftModel."
        )


def make_layer(config: AdaptionPromptConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> Optional[AdaptedAttention]:
    """The record's ``layer_factory``: an :class:`AdaptedAttention` for an attention module it can read."""
    if attention.layout(base_layer) is None:
        return None
    layer = AdaptedAttention(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
