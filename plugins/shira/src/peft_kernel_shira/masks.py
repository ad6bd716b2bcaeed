"""Where a SHiRA adapter's trainable entries sit: ``[2, r * (m + n)]`` int32 ``(row, column)``
positions in row-major order, from the built-in random mask or a user ``mask_fn``."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from peft_kernel.plugin_api import ConfigError


def random_positions(out_features: int, in_features: int, count: int, seed: Optional[int]) -> torch.Tensor:
    """The first ``count`` entries of a random permutation of the ``out * in`` flat positions,
    drawn on the CPU from a generator seeded with ``seed`` (left at torch's default seed when
    ``None``), in row-major order. HF PEFT's ``random`` mask selects the same entries."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:count].sort().values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


def positions_from_mask_fn(mask_fn: Callable[..., Any], base_layer: nn.Linear, r: int, count: int,
                           random_seed: Optional[int], module_name: str) -> torch.Tensor:
    """The positions of the ones of ``mask_fn(base_layer, r, random_seed=random_seed)`` (HF PEFT's
    call), which must be a ``[out, in]`` 0/1 tensor with exactly ``count`` ones."""
    mask = mask_fn(base_layer, r, random_seed=random_seed)
    shape = tuple(base_layer.weight.shape)
    where = f"ShiraConfig.mask_fn for module {module_name!r}"
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ConfigError(f"{where} must return a tensor of the weight's shape {shape}, got {got}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ConfigError(f"{where} must return a binary mask (only 0 and 1)")
    ones = int(mask.count_nonzero())
    if ones != count:
        raise ConfigError(f"{where} returned {ones} ones; it must select exactly r * (out + in) = {count} entries")
    return mask.nonzero().T.to(device="cpu", dtype=torch.int32)
