"""Task-vector merging, as HF PEFT's ``peft.utils.merge_utils`` (same names, signatures, numbers).

A *task tensor* is what one adapter adds to a weight (or one of its factors). Merging ``n`` of
them with ``weights`` (one scalar per task):

* ``task_arithmetic``: ``sum_i w_i t_i``.
* ``magnitude_prune``: each ``t_i`` keeps its ``density`` fraction of largest-magnitude entries,
  then task arithmetic.
* ``ties`` (TIES-Merging): magnitude pruning, then a majority sign per entry (by summed value,
  ``"total"``, or by count, ``"frequency"``); entries that disagree with it are dropped and the
  weighted survivors averaged over how many survived.
* ``dare_linear`` / ``dare_ties`` (DARE): each entry is kept with probability ``density`` and kept
  entries divided by ``density`` (so the expectation is unchanged), then task arithmetic / TIES.

Random pruning draws ``torch.bernoulli`` over a tensor of ``density``: under the same
``torch.manual_seed`` the masks are the ones HF PEFT draws.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

__all__ = [
    "calculate_majority_sign_mask",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "magnitude_based_pruning",
    "magnitude_prune",
    "prune",
    "random_pruning",
    "reshape_weight_task_tensors",
    "task_arithmetic",
    "ties",
]


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` viewed with trailing singleton dimensions so it broadcasts against ``task_tensors``."""
    extra = task_tensors.dim() - weights.dim()
    return weights.view(*weights.shape, *([1] * extra))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    flat = tensor.reshape(-1)
    keep = int(density * tensor.numel())
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=keep, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability ``density`` (a Bernoulli mask); with ``rescale`` the kept
    entries are divided by ``density`` so the expected value of the tensor is unchanged."""
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept


def prune(
    tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False
) -> torch.Tensor:
    """Prune ``tensor`` to a ``density`` fraction by ``method`` (``"magnitude"`` or ``"random"``).

    ``density >= 1`` warns and returns the tensor unchanged; a negative density is a ``ValueError``."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=2)
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(
    tensor: torch.Tensor, method: Literal["total", "frequency"] = "total"
) -> torch.Tensor:
    """For task tensors stacked on dim 0: where each one agrees with the majority sign of its entry.

    ``"total"`` takes the sign of the summed values, ``"frequency"`` the sign held by more tasks;
    a tie (zero) counts as positive."""
    signs = tensor.sign()
    if method == "total":
        votes = tensor.sum(dim=0)
    elif method == "frequency":
        votes = signs.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    majority = torch.where(votes >= 0, 1, -1)
    return signs == majority


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Average, per entry, the task tensors (stacked on dim 0) that agree with the majority sign."""
    total = (task_tensors * majority_sign_mask).sum(dim=0)
    count = majority_sign_mask.sum(dim=0)
    return total / torch.clamp(count, min=1.0)


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (stacked * reshape_weight_task_tensors(stacked, weights)).sum(dim=0)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[i] * task_tensors[i]``."""
    return _weighted_sum(torch.stack(task_tensors, dim=0), weights)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Task arithmetic over the task tensors pruned by magnitude to ``density``."""
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    return _weighted_sum(torch.stack(pruned, dim=0), weights)


def _sign_elected(stacked: torch.Tensor, weights: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    return disjoint_merge(stacked * reshape_weight_task_tensors(stacked, weights), mask)


def ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """TIES: prune by magnitude, elect a sign per entry (on the unweighted pruned tensors), average
    the weighted entries that agree with it."""
    pruned = [prune(t, density, method="magnitude") for t in task_tensors]
    return _sign_elected(torch.stack(pruned, dim=0), weights, majority_sign_method)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE then task arithmetic: random pruning to ``density`` with rescaling by ``1/density``."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _weighted_sum(torch.stack(pruned, dim=0), weights)


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """DARE then TIES' sign election and disjoint merge."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    return _sign_elected(torch.stack(pruned, dim=0), weights, majority_sign_method)
