"""Two HF PEFT public names kept for code that imports them: the prefix-tuning cache
post-processors of old transformers releases.

With the transformers this project supports (>= 4.54 caches are ``Cache`` objects for every
model) HF PEFT's mapping is empty, so it is empty here too; ``bloom_model_postprocess_past_key_value``
is the pure reshape HF PEFT applied to BLOOM's legacy fused key/value layout.
"""

from __future__ import annotations

from typing import Any, Callable

TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING: dict[str, Callable[..., Any]] = {}


def bloom_model_postprocess_past_key_value(past_key_values: tuple[Any, ...]) -> tuple[tuple[Any, Any], ...]:
    """``[2 * layers, batch, heads, tokens, head_dim]`` (as one tuple of tensors) to BLOOM's legacy
    per-layer ``(key [batch*heads, head_dim, tokens], value [batch*heads, tokens, head_dim])``."""
    import torch

    stacked = torch.cat(past_key_values)
    total, batch, heads, tokens, head_dim = stacked.shape
    keys = stacked[: total // 2].transpose(2, 3).reshape(total // 2, batch * heads, head_dim, tokens)
    values = stacked[total // 2:].reshape(total // 2, batch * heads, tokens, head_dim)
    return tuple(zip(keys, values))
