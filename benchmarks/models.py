"""Tiny Llama-shaped models built from configs (no downloads) with N LoRA adapters, HF and ours."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    hidden: int = 512
    layers: int = 4
    rank: int = 16
    rows: int = 16
    prompt: int = 64  # tokens per row at prefill; the KV cache length at decode
    vocab: int = 1024

    @property
    def intermediate(self) -> int:
        return int(self.hidden * 2.6875)  # Llama's 4096 -> 11008 ratio

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)

    def label(self) -> str:
        return f"h{self.hidden}-L{self.layers}-r{self.rank}"


def base_model(shape: Shape, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, vocab_size=shape.vocab,
        max_position_embeddings=max(512, shape.prompt * 2),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def lora_config(lib, shape: Shape):
    return lib.LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules=TARGETS, init_lora_weights=False)


def with_adapters(base: nn.Module, shape: Shape, count: int) -> tuple[nn.Module, nn.Module]:
    """(HF peft model, peft-kernel model), each with ``count`` adapters a0..a{count-1}; ours gets
    HF's weights so both compute the same thing."""
    import peft

    import peft_kernel as pk

    hf = peft.get_peft_model(copy.deepcopy(base), lora_config(peft, shape), adapter_name="a0")
    ours = pk.get_peft_model(copy.deepcopy(base), lora_config(pk, shape), adapter_name="a0")
    for i in range(1, count):
        hf.add_adapter(f"a{i}", lora_config(peft, shape))
        ours.add_adapter(f"a{i}", lora_config(pk, shape))
    for i in range(count):
        state = peft.get_peft_model_state_dict(hf, adapter_name=f"a{i}")
        pk.set_peft_model_state_dict(ours, state, adapter_name=f"a{i}")
    for model in (hf, ours):
        for p in model.parameters():
            p.requires_grad_(False)
    return hf.eval(), ours.eval()


def flops_per_token(shape: Shape, context: int) -> tuple[float, float]:
    """(base model FLOPs, extra LoRA FLOPs) per token: 2 per multiply-add; attention at ``context``."""
    h, i = shape.hidden, shape.intermediate
    linears = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]
    base = shape.layers * (sum(2 * a * b for a, b in linears) + 4 * context * h) + 2 * h * shape.vocab
    lora = shape.layers * sum(2 * shape.rank * (a + b) for a, b in linears)
    return float(base), float(lora)
