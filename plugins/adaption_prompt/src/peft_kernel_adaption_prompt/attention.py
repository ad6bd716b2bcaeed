"""What Llama-Adapter needs from an attention module, read through the module's own projections.

Two layouts are recognised by structure, not by model name, so the many transformers attention
classes that share them work unchanged:

``"split"``
    separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` linears and ``head_dim`` (Llama,
    Mistral and their kin). Queries get the rotary embedding the model hands the attention as
    ``position_embeddings`` (transformers' current API), through the modelling module's own
    ``apply_rotary_pos_emb``; the prompt's keys get none (it has no position). Key/value heads are
    repeated for grouped-query attention. The prompt attention's output goes through ``o_proj``'s
    weight; its bias, already in the attention's own output, is not added a second time (HF PEFT
    adds it again, so on models with ``attention_bias=True`` its zero-gated adapter is no identity).
``"fused"``
    GPT-2's ``c_attn`` (queries, keys and values in one projection), ``split_size`` and
    ``head_dim``. As in HF PEFT the prompt attention's output is added *without* ``c_proj``.

Nothing here copies a transformers forward: the base attention runs untouched and these helpers
compute the extra term only.
"""

from __future__ import annotations

import inspect
import sys
from functools import lru_cache
from typing import Any, Callable, Optional

import torch
from torch import nn

from peft_kernel.plugin_api import UnsupportedFeatureError

SPLIT, FUSED = "split", "fused"


def layout(module: nn.Module) -> Optional[str]:
    """``"split"``, ``"fused"`` or ``None`` when ``module`` is no attention Llama-Adapter can adapt."""
    if not isinstance(getattr(module, "head_dim", None), int):
        return None
    if all(isinstance(getattr(module, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return SPLIT
    if isinstance(getattr(module, "c_attn", None), nn.Module) and isinstance(getattr(module, "split_size", None), int):
        return FUSED
    return None


def hidden_size(module: nn.Module) -> int:
    """The width of the hidden states the attention reads (the prompt's width)."""
    if layout(module) == SPLIT:
        return int(module.q_proj.weight.shape[1])
    return int(module.c_attn.weight.shape[0])  # transformers' Conv1D stores [in, out]


@lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The attention's forward arguments by name (``hidden_states``, ``position_embeddings``...)."""
    bound = _signature(type(module)).bind_partial(module, *args, **kwargs).arguments
    extra = bound.pop("kwargs", {})
    return {**bound, **extra}


def _rotary(module: nn.Module) -> Callable[..., Any]:
    apply = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if apply is None:
        raise UnsupportedFeatureError(
            f"adaption prompt: {type(module).__name__} receives position_embeddings but its modelling module has no "
            "apply_rotary_pos_emb to rotate the queries with."
        )
    return apply


def queries(module: nn.Module, hidden: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
    """``[batch, heads, seq, head_dim]``: the queries the attention computes from ``hidden``."""
    batch, seq = hidden.shape[:2]
    if layout(module) == FUSED:
        q = module.c_attn(hidden).split(module.split_size, dim=2)[0]
        return q.view(batch, seq, -1, module.head_dim).transpose(1, 2)
    q = module.q_proj(hidden).view(batch, seq, -1, module.head_dim).transpose(1, 2)
    if position_embeddings is None:
        return q
    cos, sin = position_embeddings
    return _rotary(module)(q, q, cos, sin)[0]


def prompt_keys_values(module: nn.Module, prompts: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts [n, length, hidden]`` -> keys and values ``[n, heads, length, head_dim]``."""
    n, length = prompts.shape[:2]
    if layout(module) == FUSED:
        _, k, v = module.c_attn(prompts).split(module.split_size, dim=2)
    else:
        k, v = module.k_proj(prompts), module.v_proj(prompts)
    k = k.view(n, length, -1, module.head_dim).transpose(1, 2)
    v = v.view(n, length, -1, module.head_dim).transpose(1, 2)
    groups = heads // k.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return k, v


def project_output(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, heads * head_dim]`` -> what is added to the attention's output."""
    if layout(module) == FUSED:
        return output
    projected = module.o_proj(output)
    bias = getattr(module.o_proj, "bias", None)
    return projected if bias is None else projected - bias
