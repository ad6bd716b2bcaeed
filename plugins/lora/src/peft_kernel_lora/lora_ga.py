"""LoRA-GA initialisation (``init_lora_weights="lora_ga"``): the adapter starts aligned with the
gradient of the full weight.

:func:`preprocess_loraga` runs before the adapter is created: ``train_step()`` runs forward and
backward passes on calibration data; every targeted ``nn.Linear`` (or transformers ``Conv1D``)
keeps the mean of its weight's gradients over the backward passes that reached it, in the
weight's layout and dtype (summed in that dtype, as HF PEFT), as ``_peft_loraga_grad`` (HF
PEFT's attribute; its cache file keys are ``"<module>._peft_loraga_grad"``). The model is in
training mode meanwhile (dropout included); its mode and ``requires_grad`` flags are then restored
and all gradients cleared.

When the adapter is created, :func:`initialize` takes ``G = U·S·Vᵀ`` (``torch.svd_lowrank`` with
``q = min(4r, out, in)`` and 4 iterations, as HF PEFT, so the same random state gives the same
adapter) and splits the first ``2r`` directions between the factors (see
``LoraGAConfig.direction``): A gets rows of ``Vᵀ``, B columns of ``U·S``, B is then scaled (see
``LoraGAConfig.scale``; "stable" takes ``m`` from the stored weight's first dimension, the input
size for ``Conv1D``, as HF PEFT). The base weight becomes ``W - s·B·A`` (``s`` the LoRA scaling), so the
model output is unchanged; the conversion to plain LoRA on the original base is PiSSA's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from peft_kernel.plugin_api import UnsupportedFeatureError
from peft_kernel_lora.calibration import linear_targets, load_tensors, save_tensors
from peft_kernel_lora.lora_ga_config import MISSING, NOT_IMPLEMENTED, LoraGAConfig, lora_ga_settings

if TYPE_CHECKING:
    from peft_kernel_lora.config import LoraConfig
    from peft_kernel_lora.layers import LoraLayer

GRAD = "_peft_loraga_grad"
"""The attribute (and cache key suffix) holding a layer's estimated gradient."""


class LoraGAError(ValueError):
    """LoRA-GA cannot run as asked (no gradient estimated for a layer, a rank too large...)."""


def preprocess_loraga(model: nn.Module, lora_config: LoraConfig, train_step: Callable[[], None],
                      cache_file: Optional[str] = None) -> None:
    """Estimate the weight gradient of every layer ``lora_config`` targets and leave it on the layer,
    for ``get_peft_model(model, lora_config)`` with ``init_lora_weights="lora_ga"``.

    ``train_step()`` runs the forward and backward passes (several batches: all are averaged).
    ``cache_file``: the gradients are loaded from it when it exists, else estimated and saved there."""
    if lora_config.init_lora_weights != "lora_ga" or lora_config.lora_ga_config is None:
        raise ValueError(MISSING)
    lora_ga_settings(lora_config.lora_ga_config)
    targets = linear_targets(model, lora_config, "lora_ga", LoraGAError, "preprocess_loraga")
    cached = load_tensors(cache_file)
    if cached is None:
        grads = _estimate(model, targets, train_step)
        save_tensors({f"{name}.{GRAD}": g.cpu() for name, g in grads.items()}, cache_file)
    else:
        missing = [name for name in targets if f"{name}.{GRAD}" not in cached]
        if missing:
            raise LoraGAError(f"preprocess_loraga: cache_file {cache_file!r} has no gradient for {missing}")
        grads = {name: cached[f"{name}.{GRAD}"] for name in targets}
    for name, module in targets.items():
        setattr(module, GRAD, grads[name].to(device=module.weight.device))


def _estimate(model: nn.Module, targets: dict[str, nn.Module], train_step: Callable[[], None]) -> dict[str, torch.Tensor]:
    """The mean weight gradient of every target over the backward passes ``train_step`` runs."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(targets, 0)

    def accumulate(name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:  # in the weight's dtype, as HF PEFT (and autograd) accumulate
            grad = grad.detach()
            sums[name] = grad.clone() if name not in sums else sums[name] + grad
            counts[name] += 1
        return hook

    flags = {name: module.weight.requires_grad for name, module in targets.items()}
    handles, was_training = [], model.training
    try:
        model.train()  # as HF PEFT: dropout is live while the gradients are estimated
        for name, module in targets.items():
            module.weight.requires_grad_(True)
            handles.append(module.weight.register_hook(accumulate(name)))
        train_step()
    finally:
        for handle in handles:
            handle.remove()
        for name, module in targets.items():
            module.weight.requires_grad_(flags[name])
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        raise LoraGAError(f"preprocess_loraga: train_step never ran a backward pass through the targeted layers {missing}")
    return {name: total / counts[name] for name, total in sums.items()}


def factors(grad: torch.Tensor, rank: int, settings: LoraGAConfig, stable_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` from the gradient ``grad`` ([out, in], float32); ``stable_dim`` is
    the ``m`` of ``scale="stable"``."""
    for field, refused in NOT_IMPLEMENTED.items():
        if getattr(settings, field) in refused:
            raise UnsupportedFeatureError(f"LoraGAConfig.{field}={getattr(settings, field)!r} is not implemented by "
                                          "peft-kernel-lora yet; use another value")
    out_features, in_features = grad.shape
    if 2 * rank > min(out_features, in_features):
        raise LoraGAError(f"init_lora_weights='lora_ga' takes 2r={2 * rank} singular directions of the gradient, but "
                          f"the layer has min(out_features, in_features)={min(out_features, in_features)}")
    left, singular, right = torch.svd_lowrank(grad, q=min(4 * rank, out_features, in_features), niter=4)
    weighted = left * singular[None, :]
    if settings.direction == "ArBr":
        a_idx, b_idx = slice(1, 2 * rank, 2), slice(0, 2 * rank, 2)
    elif settings.direction == "A2rBr":
        a_idx, b_idx = slice(rank, 2 * rank), slice(0, rank)
    elif settings.direction == "ArB2r":
        a_idx, b_idx = slice(0, rank), slice(rank, 2 * rank)
    else:  # random: the same r of the first 2r directions for both (HF PEFT's draw, after the SVD's)
        a_idx = b_idx = torch.randperm(2 * rank)[:rank].to(grad.device)
    a, b = right[:, a_idx].T, weighted[:, b_idx]
    if settings.scale == "stable":
        b = b * (stable_dim ** 0.25 / settings.stable_gamma ** 0.5)
    return a.contiguous(), b.contiguous()


@torch.no_grad()
def initialize(layer: LoraLayer, adapter_name: str, lora_ga_config: Any) -> None:
    """Write the adapter from the gradient :func:`preprocess_loraga` left on ``layer``'s base layer,
    rewrite the base weight to the residual and drop the gradient."""
    from peft_kernel_lora.init import write_factors
    from peft_kernel_lora.layers import Linear

    settings = lora_ga_settings(lora_ga_config)
    base = layer.base_layer
    grad = getattr(base, GRAD, None)
    if not isinstance(layer, Linear):
        raise UnsupportedFeatureError("init_lora_weights='lora_ga' supports nn.Linear and Conv1D layers only")
    if grad is None:
        raise LoraGAError(f"`{GRAD}` not found for this layer: run `preprocess_loraga` on the model first.")
    # "stable" scales by the stored weight's first dimension, as HF PEFT: in_features for Conv1D
    stable_dim = grad.shape[0]
    grad = layer.to_base_layout(grad.to(torch.float32))  # the weight's layout -> [out, in]
    a, b = factors(grad, layer.r[adapter_name], settings, stable_dim)
    write_factors(layer, adapter_name, a, b, layer.base_weight().detach().to(torch.float32))
    delattr(base, GRAD)
