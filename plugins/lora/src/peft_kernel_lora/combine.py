"""LoRA's ``add_weighted_adapter``: how LoRA adapters combine into a new one (HF PEFT's rules).

``plan`` checks the request and builds the new adapter's config; the core injects the adapter and
calls the returned ``fill`` on every LoRA layer that got it. Three families:

* ``cat``: the factors are stacked, ``A = [w_i s_i A_i]``, ``B = [B_i]``: rank ``sum r_i``, exact.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the rule (from
  :mod:`peft_kernel.utils.merge_utils`) is applied to the ``A`` factors and to the ``B`` factors
  separately, with ``sqrt(|w_i s_i|)`` on each side and the sign on ``A``; needs equal ranks.
* ``svd`` and ``*_svd``: the rule is applied to the full deltas ``w_i s_i B_i A_i`` and the result
  truncated back to rank ``svd_rank`` (default: the largest rank) by SVD, ``B = U S``, ``A = Vh``
  (entries clamped to a quantile with ``svd_clamp``).

As in HF PEFT the new adapter has ``lora_alpha = r``, so its scaling is 1 (``sqrt(r)`` with rsLoRA),
and it keeps the first adapter's other settings (``modules_to_save`` included, a fresh copy).
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Any, Callable

import attrs

LINEAR_FAMILY = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_FAMILY = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def _max_rank(config: Any) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def plan(adapters: list[str], configs: list[Any], weights: list[float], combination_type: str,
         options: dict[str, Any]) -> tuple[Any, Callable[[Any, str], None]]:
    for name, config in zip(adapters, configs):
        if config.target_parameters:
            raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{name}')")
        if config.use_dora:
            raise ValueError(f"add_weighted_adapter does not combine DoRA adapters (adapter {name!r} has use_dora=True): "
                             "a DoRA magnitude cannot be combined with the rules for low-rank factors.")
        for field, what in (("kasa_config", "KaSA"), ("use_bdlora", "BD-LoRA")):
            if getattr(config, field) is not None:
                raise ValueError(f"add_weighted_adapter does not combine {what} adapters (adapter {name!r} sets {field}): "
                                 "their factors are not plain LoRA A/B matrices.")
    if len(adapters) == 1:  # HF: a single adapter can only be combined linearly
        combination_type = "linear"
    ranks = [_max_rank(c) for c in configs]
    if combination_type in LINEAR_FAMILY:
        if len(set(ranks)) != 1:
            raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                             "dare_ties or dare_linear.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in SVD_FAMILY:
        new_rank = options["svd_rank"] or max(ranks)
    else:
        raise ValueError(f"Invalid combination_type: {combination_type}")

    kinds = {type(c.target_modules) for c in configs}
    if len(kinds) > 1:
        raise ValueError("all adapter configs should follow the same target modules type. Combining adapters with "
                         "`target_modules` type being a mix of list/set and string is not supported.")
    kind = kinds.pop()
    if kind is str:
        targets: Any = "|".join(f"({c.target_modules})" for c in configs)
    elif kind in (set, list):
        targets = reduce(set.union, (set(c.target_modules) for c in configs))
    else:
        raise TypeError(f"Invalid type {kind} found in target_modules")
    new_config = attrs.evolve(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=targets,
                              alpha_pattern={}, rank_pattern={})

    def fill(layer: Any, adapter_name: str) -> None:
        _fill(layer, adapter_name, adapters, weights, combination_type, new_rank, options)

    return new_config, fill


def _factors(layer: Any, adapter: str) -> tuple[Any, Any] | None:
    """``(A, B)`` parameters of ``adapter`` in ``layer`` (``None`` when the layer lacks it)."""
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


def _fill(layer: Any, name: str, adapters: list[str], weights: list[float], combination_type: str,
          new_rank: int, options: dict[str, Any]) -> None:
    import torch

    from peft_kernel_lowrank import mixed

    target = _factors(layer, name)
    if target is None:
        return
    present = [(a, w) for a, w in zip(adapters, weights) if _factors(layer, a) is not None]
    if not present:
        raise ValueError(f"No matching LoRAs found for the new adapter {name!r} in this layer.")
    with torch.no_grad():
        if combination_type == "cat":
            new_a, new_b = _cat(layer, present)
        elif combination_type in SVD_FAMILY:
            new_a, new_b = _svd(layer, present, combination_type, new_rank, options, target)
        else:
            new_a, new_b = _per_factor(layer, present, combination_type, options)
        a, b = target
        a.zero_()
        b.zero_()
        a[: new_a.shape[0]] = new_a.to(a.dtype)
        b[:, : new_b.shape[1]] = new_b.to(b.dtype)
    mixed.drop_stack(layer)


def _cat(layer: Any, present: list[tuple[str, float]]) -> tuple[Any, Any]:
    import torch

    a_parts, b_parts = [], []
    for adapter, weight in present:
        a, b = _factors(layer, adapter)
        a_parts.append(a * weight * layer.scaling[adapter])
        b_parts.append(b)
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def _rule(combination_type: str) -> Callable[..., Any]:
    from peft_kernel.plugin_api import merge_utils as mu

    base = combination_type.removesuffix("_svd")
    if base in ("linear", "svd"):
        return lambda tensors, weights, options: mu.task_arithmetic(tensors, weights)
    if base == "ties":
        return lambda tensors, weights, o: mu.ties(tensors, weights, o["density"], o["majority_sign_method"])
    if base == "dare_linear":
        return lambda tensors, weights, o: mu.dare_linear(tensors, weights, o["density"])
    if base == "dare_ties":
        return lambda tensors, weights, o: mu.dare_ties(tensors, weights, o["density"], o["majority_sign_method"])
    if base == "magnitude_prune":
        return lambda tensors, weights, o: mu.magnitude_prune(tensors, weights, o["density"])
    raise ValueError(f"Invalid combination_type: {combination_type}")


def _per_factor(layer: Any, present: list[tuple[str, float]], combination_type: str,
                options: dict[str, Any]) -> tuple[Any, Any]:
    """The rule on the A factors and on the B factors; ``w s`` split as ``sqrt|ws|`` per side, the
    sign on A only (so a negative weight subtracts)."""
    import torch

    rule = _rule(combination_type)
    a_list, b_list, wa, wb = [], [], [], []
    for adapter, weight in present:
        a, b = _factors(layer, adapter)
        ws = weight * layer.scaling[adapter]
        root = math.sqrt(abs(ws))
        wa.append(root if ws >= 0 else -root)
        wb.append(root)
        a_list.append(a)
        b_list.append(b)
    device = a_list[0].device
    new_a = rule(a_list, torch.tensor(wa, device=device), options)
    new_b = rule(b_list, torch.tensor(wb, device=device), options)
    return new_a, new_b


def _svd(layer: Any, present: list[tuple[str, float]], combination_type: str, new_rank: int,
         options: dict[str, Any], target: tuple[Any, Any]) -> tuple[Any, Any]:
    import torch

    rule = _rule(combination_type)
    # each delta in the base weight's layout (Conv1D [in, out], embedding [vocab, dim]), as HF merges them
    deltas = [layer.to_base_layout(layer.lora_weight(a) * layer.scaling[a]) for a, _ in present]
    weights = torch.tensor([w for _, w in present], device=deltas[0].device)
    merged = rule(deltas, weights, options)
    if merged.dim() > 2:  # convolutions: [out, in * kernel]
        matrix = merged.flatten(1)
    else:  # back to [out, in]
        matrix = layer.to_base_layout(merged)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=options["svd_full_matrices"], driver=options["svd_driver"])
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    clamp = options["svd_clamp"]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u = u.clamp(-high, high)
        vh = vh.clamp(-high, high)
    a, b = target
    return vh.reshape(vh.shape[0], *a.shape[1:]), u.reshape(u.shape[0], u.shape[1], *b.shape[2:])
