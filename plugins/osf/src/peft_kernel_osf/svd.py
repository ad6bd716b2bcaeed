"""The split of a weight into its preserved (high) and trainable (low) singular subspaces, and the
gradient projections that keep training out of the high one. Imports torch: used by the layer only."""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Union

import torch

from peft_kernel.plugin_api import ConfigError


def preserved_rank(config: Any, module_name: str, min_dim: int) -> int:
    """The number of top singular directions of ``module_name`` kept frozen (HF PEFT's rule): the
    value of the first ``rank_pattern`` key found in the name (``re.search``), else
    ``effective_rank``; ``None`` is half of ``min_dim``, a float in (0, 1] that fraction of it
    (rounded down), anything else its ``int``; at most ``min_dim``."""
    value: Union[int, float, None] = config.effective_rank
    for pattern, override in (config.rank_pattern or {}).items():
        if re.search(pattern, module_name):
            value = override
            break
    if value is None:
        rank = min_dim // 2
    elif isinstance(value, float) and 0.0 < value <= 1.0:
        rank = int(value * min_dim)
    else:
        rank = int(value)
    rank = min(rank, min_dim)
    if rank <= 0:
        raise ConfigError(
            f"OSF: the preserved rank of {module_name!r} (effective_rank / rank_pattern = {value!r} on a weight "
            f"whose smaller dimension is {min_dim}) is {rank}; it must be at least 1"
        )
    return rank


class Decomposition(NamedTuple):
    """``weight = U_high diag(S_high) V_high + U_low diag(S_low) V_low`` (thin SVD, singular values
    descending). ``U_high`` is kept only when ``U`` is not square (more rows than columns in the
    weight), ``V_high`` only when ``V`` is not; otherwise the projections use the low parts."""

    U_low: torch.Tensor
    S_low: torch.Tensor
    V_low: torch.Tensor
    U_high: torch.Tensor | None
    V_high: torch.Tensor | None


def decompose(weight: torch.Tensor, preserved: int) -> Decomposition:
    """The thin SVD of ``weight`` split after its top ``preserved`` directions. As in HF PEFT the SVD
    runs in float32 (bit-equal factors on CPU) and the factors take the weight's dtype."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    out_features, in_features = weight.shape
    dtype = weight.dtype

    def part(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).contiguous()

    return Decomposition(
        part(u[:, preserved:]), part(s[preserved:]), part(vh[preserved:]),
        part(u[:, :preserved]) if out_features > in_features else None,
        part(vh[:preserved]) if in_features > out_features else None,
    )


def project_u(grad: torch.Tensor, high: torch.Tensor | None, low: torch.Tensor) -> torch.Tensor:
    """``grad`` of ``U_low`` ``[out, r]`` without its component in the span of ``U_high``: with
    ``U_high`` kept, ``g - U_high (U_high^T g)``; else (``U`` square) ``U_low0 (U_low0^T g)`` with the
    initial ``U_low0``, the same projection."""
    if high is not None:
        high = high.to(grad.dtype)
        return grad - high @ (high.T @ grad)
    low = low.to(grad.dtype)
    return low @ (low.T @ grad)


def project_v(grad: torch.Tensor, high: torch.Tensor | None, low: torch.Tensor) -> torch.Tensor:
    """``grad`` of ``V_low`` ``[r, in]`` without its component in the row space of ``V_high``:
    ``g - (g V_high^T) V_high``, or ``(g V_low0^T) V_low0`` when ``V`` is square."""
    if high is not None:
        high = high.to(grad.dtype)
        return grad - (grad @ high.T) @ high
    low = low.to(grad.dtype)
    return (grad @ low.T) @ low
