"""What Llama-Adapter needs from an attention module, read through the module's own projections.

Two layouts are recognised by structure, not by model name, so the many transformers attention
classes that share them work unchanged:

``"split"``
    separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` linears and ``head_dim`` (Llama,
    Mistral and their kin). Queries get the rotary embedding the model hands the attention as
    ``position_embeddings`` (transformers' current API), through the modelling module's own
    ``apply_rotary_pos_emb``; the prompt's keys get none (it has no position). Key/value heads are
    repeated for grouped-query attention. The prompt attention's output joins the attention's own
    at ``o_proj``'s input, so ``o_proj``'s bias applies once (HF PEFT adds it a second time, so on
    models with ``attention_bias=True`` its zero-gated adapter is no identity).
``"fused"``
    GPT-2's ``c_attn`` (queries, keys and values in one projection), ``split_size`` and
    ``head_dim``. As in HF PEFT the prompt attention's output is added *without* ``c_proj``.

Nothing here copies a transformers forward: the base attention runs unchanged, and forward hooks
held for one call only take its queries and add the extra term.
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


def _queries(module: nn.Module, projected: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
    """The query projection's output ``[batch, seq, ...]`` -> queries ``[batch, heads, seq, head_dim]``."""
    if layout(module) == FUSED:
        projected = projected.split(module.split_size, dim=2)[0]
    q = projected.view(*projected.shape[:2], -1, module.head_dim).transpose(1, 2)
    if position_embeddings is None or layout(module) == FUSED:
        return q
    cos, sin = position_embeddings
    return _rotary(module)(q, q, cos, sin)[0]


def run_with_prompt_term(module: nn.Module, args: tuple, kwargs: dict,
                         term: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Run the attention ``module(*args, **kwargs)`` with ``term(queries)`` (``[batch, seq, heads *
    head_dim]``) added where the prompt attention enters: to ``o_proj``'s input in the split layout
    (so ``o_proj``'s weight and bias apply once, to the sum), to the output in the fused one.

    The queries are those the attention itself computes: the query projection's output, captured by
    a forward hook for the duration of this call, not computed a second time."""
    position_embeddings = call_arguments(module, args, kwargs).get("position_embeddings")
    split = layout(module) == SPLIT
    captured: list[torch.Tensor] = []
    added: list[bool] = []

    def grab(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        captured.append(output)

    def add(_module: nn.Module, inputs: tuple) -> tuple:
        if not captured:
            raise UnsupportedFeatureError(f"adaption prompt: {type(module).__name__} called o_proj before q_proj.")
        extra = term(_queries(module, captured[-1], position_embeddings))
        added.append(True)
        return (inputs[0] + extra.to(inputs[0].dtype), *inputs[1:])

    handles = [(module.q_proj if split else module.c_attn).register_forward_hook(grab)]
    if split:
        handles.append(module.o_proj.register_forward_pre_hook(add))
    try:
        output = module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if not captured or (split and not added):
        raise UnsupportedFeatureError(
            f"adaption prompt: {type(module).__name__}.forward did not call its "
            f"{'q_proj and o_proj' if split else 'c_attn'} modules, so the prompt attention has nowhere to enter."
        )
    if split:
        return output
    extra = term(_queries(module, captured[-1], None))
    if isinstance(output, tuple):
        return (output[0] + extra.to(output[0].dtype), *output[1:])
    return output + extra.to(output.dtype)


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
