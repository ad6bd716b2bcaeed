"""The RoAd map ``y -> c * y + s * rotate_half(y)`` on the last dimension, grouped.

Within each group of ``g`` features, ``rotate_half`` sends the two halves ``(y_lo, y_hi)`` to
``(-y_hi, y_lo)``, so feature ``i`` of a pair ``(i, i + g/2)`` becomes ``c_i y_i - s_i y_{i+g/2}`` and its
partner ``s_j y_i + c_j y_j``: a 2 x 2 rotation by angle ``theta`` scaled by ``alpha`` per pair, with
``c = alpha cos theta`` and ``s = alpha sin theta`` per feature.
"""

from __future__ import annotations

import torch


def swap_half(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(v_hi, v_lo)`` within each group: every feature's value moved to its partner's place."""
    halves = v.unflatten(-1, (-1, 2, group_size // 2))
    return halves.flip(-2).flatten(-3)


def coefficients(variant: str, theta: torch.Tensor, alpha: torch.Tensor, out_features: int,
                 group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature ``(c, s)`` of length ``out_features`` from an adapter's parameters, in HF PEFT's
    layouts: ``road_1`` holds one value per pair (``[groups, g/2]``), shared by both features;
    ``road_2`` one per feature; ``road_4`` two per feature, laid out per group as ``[cos part (g),
    sin part (g)]``."""
    groups, half = out_features // group_size, group_size // 2
    if variant == "road_1":
        theta = theta.view(groups, 1, half).expand(groups, 2, half).reshape(out_features)
        alpha = alpha.view(groups, 1, half).expand(groups, 2, half).reshape(out_features)
    if variant == "road_4":
        cos_part = (alpha * torch.cos(theta)).view(groups, 2, group_size)[:, 0]
        sin_part = (alpha * torch.sin(theta)).view(groups, 2, group_size)[:, 1]
        return cos_part.reshape(out_features), sin_part.reshape(out_features)
    return alpha * torch.cos(theta), alpha * torch.sin(theta)


def rotate(y: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """``c * y + s * rotate_half(y)`` (``c``, ``s`` broadcast against ``y`` on the feature dimension):
    one product and two fused multiply-adds on the two halves of each group, no rotated copy of ``y``."""
    split = (-1, 2, group_size // 2)
    halves, c, s = y.unflatten(-1, split), c.unflatten(-1, split), s.unflatten(-1, split)
    out = halves * c
    out[..., 0, :].addcmul_(halves[..., 1, :], s[..., 0, :], value=-1)
    out[..., 1, :].addcmul_(halves[..., 0, :], s[..., 1, :])
    return out.flatten(-3)


def inverse(c: torch.Tensor, s: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c', s')`` of the inverse map: each 2 x 2 block ``[[c_i, -s_i], [s_j, c_j]]`` inverted,
    ``c' = swap(c) / det``, ``s' = -s / det`` with ``det = c_i c_j + s_i s_j`` of the pair."""
    det = c * swap_half(c, group_size) + s * swap_half(s, group_size)
    return swap_half(c, group_size) / det, -s / det
