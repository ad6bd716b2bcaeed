"""IA3's ``add_weighted_adapter`` (HF PEFT's ``IA3Model.add_weighted_adapter``): the new adapter's
vector is ``sum_i w_i l_i`` over the adapters present in each layer, on the union of their target
and feedforward modules. IA3 has this one linear rule, so ``combination_type`` may be ``"linear"``
(or the signature's default, ``"svd"``, which HF's IA3 signature does not have) and the LoRA-only
options must stay at their defaults.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

_DEFAULT_OPTIONS = dict(svd_rank=None, svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None,
                        majority_sign_method="total")


def _union(configs: list[Any], field: str) -> Any:
    values = [getattr(c, field) for c in configs]
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise ValueError("All adapter configs should have the same type for target and feedforward modules.")
    if kinds == {str}:
        return "|".join(f"({v})" for v in values)
    return set().union(*(set(v or ()) for v in values))


def plan(adapters: list[str], configs: list[Any], weights: list[float], combination_type: str,
         options: dict[str, Any]) -> tuple[Any, Callable[[Any, str], None]]:
    if combination_type not in ("linear", "svd"):
        raise ValueError(f"IA3 adapters combine linearly only (sum of weighted vectors); combination_type="
                         f"{combination_type!r} is not available. Use combination_type='linear'.")
    changed = sorted(k for k, v in _DEFAULT_OPTIONS.items() if options.get(k) != v)
    if changed:
        raise ValueError(f"IA3 adapters combine linearly only; the options {changed} do not apply to them.")
    kinds = ({type(c.target_modules) for c in configs}, {type(c.feedforward_modules) for c in configs})
    if any(len(k) > 1 for k in kinds):
        raise ValueError("All adapter configs should have the same type for target and feedforward modules.")
    new_config = attrs.evolve(configs[0], target_modules=_union(configs, "target_modules"),
                              feedforward_modules=_union(configs, "feedforward_modules"))

    def fill(layer: Any, adapter_name: str) -> None:
        import torch

        if adapter_name not in layer.ia3_l:
            return
        with torch.no_grad():
            target = layer.ia3_l[adapter_name]
            target.zero_()
            for adapter, weight in zip(adapters, weights):
                if adapter in layer.ia3_l:
                    target.add_(layer.ia3_l[adapter] * weight)

    return new_config, fill
