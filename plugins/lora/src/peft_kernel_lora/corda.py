"""CorDA initialisation (``init_lora_weights="corda"``): context-oriented decomposition adaptation.

:func:`preprocess_corda` runs before the adapter is created. For every targeted ``nn.Linear`` (or
transformers ``Conv1D``) it collects ``C``, the covariance of the layer's inputs over the calibration data (each forward call's
inputs ``X``, all rows of the batch, are scaled by ``|max(X)|``, ``C`` is the mean of ``XᵀX`` over
calls; HF PEFT takes one sequence per call and fails on a batch of several), damps it,
``C' = C + 0.01·mean(diag C)·I``, and decomposes ``W·C' = U·S·Vᵀ``: ``W = U·S·(C'⁻¹ᵀV)ᵀ``. The
decomposition (``CordaEigens``: ``U``, ``S`` and ``C'⁻¹ᵀV``, cropped to the layer's rank: the
largest components for ``corda_method="ipm"``, the smallest for ``"kpm"``) is left on the module.

When the adapter is created, :func:`initialize` sets, as PiSSA does, ``B = U·√(S/s)``,
``A = √(S/s)·Vᵀ`` (``s`` the LoRA scaling) and rewrites the base weight to ``W - s·B·A``; the
decomposition is then dropped from the module. The conversion to plain LoRA on the original base
(``path_initial_model_for_weight_conversion``) is PiSSA's.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from peft_kernel.plugin_api import UnsupportedFeatureError, pattern_value
from peft_kernel_lora.calibration import linear_targets, linear_weight, load_tensors, save_tensors
from peft_kernel_lora.corda_config import CordaConfig, corda_settings

if TYPE_CHECKING:
    from peft_kernel_lora.config import LoraConfig
    from peft_kernel_lora.layers import LoraLayer

DAMPING = 0.01
"""``C' = C + DAMPING·mean(diag C)·I``: keeps ``C'`` invertible when the calibration data spans
fewer directions than the layer has inputs."""


@dataclasses.dataclass
class CordaEigens:
    """One layer's cropped decomposition ``W ≈ U_WC·diag(S_WC)·V_WCᵀ`` ([out, r], [r], [in, r])."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


class CordaError(ValueError):
    """CorDA cannot run as asked (no calibration, a layer the calibration never reached...)."""


def _weight(module: nn.Module, name: str = "") -> torch.Tensor:
    return linear_weight(module, name, "corda")


def _targets(model: nn.Module, lora_config: LoraConfig) -> dict[str, nn.Module]:
    return linear_targets(model, lora_config, "corda", CordaError, "preprocess_corda")


@torch.no_grad()
def _collect_covariances(targets: dict[str, nn.Module], hooked: nn.Module, run_model: Callable[[], None],
                         settings: CordaConfig) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(targets, 0)

    def hook(name: str) -> Callable[..., None]:
        def collect(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if not settings.use_float16_for_covariance:  # else the model's own (half) precision
                x = x.to(torch.float32)
            x = x / x.max().abs()
            product = x.T @ x
            sums[name] = product if name not in sums else sums[name] + product
            counts[name] += 1
        return collect

    handles = [hooked.get_submodule(name).register_forward_hook(hook(name)) for name in targets]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        raise CordaError(f"preprocess_corda: run_model never called the targeted layers {missing}")
    covariances = {}
    for name, total in sums.items():
        covariance = total / counts[name]
        if not torch.isfinite(covariance).all():
            raise CordaError(f"preprocess_corda: the input covariance of {name!r} is not finite (an all-zero or "
                             "non-finite calibration input)")
        covariances[name] = covariance
        targets[name].sample_count = counts[name]
    return covariances


def decompose(weight: torch.Tensor, covariance: torch.Tensor, rank: int, method: str) -> CordaEigens:
    """The context-oriented SVD of ``weight`` ([out, in]) under ``covariance`` ([in, in]), cropped to
    ``rank`` components (the largest for "ipm", the smallest for "kpm"), in float32."""
    covariance = covariance.to(torch.float32)
    damped = covariance + DAMPING * torch.diag(covariance).mean() * torch.eye(
        covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    left, singular, right_h = torch.linalg.svd(weight.to(torch.float32) @ damped, full_matrices=False)
    right = (right_h @ torch.linalg.inv(damped)).T
    if rank > singular.shape[0]:
        raise CordaError(f"init_lora_weights='corda': r={rank} exceeds min(in_features, out_features)="
                         f"{singular.shape[0]}")
    keep = slice(0, rank) if method == "ipm" else slice(singular.shape[0] - rank, None)
    return CordaEigens(S_WC=singular[keep].contiguous(), U_WC=left[:, keep].contiguous(),
                       V_WC=right[:, keep].contiguous())


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config: LoraConfig, run_model: Optional[Callable[[], None]] = None,
                     hooked_model: Optional[nn.Module] = None) -> None:
    """Compute the CorDA decomposition of every targeted layer of ``model`` and leave it on the
    layer, for ``get_peft_model(model, lora_config)`` with ``init_lora_weights="corda"``.

    ``run_model()`` runs the calibration data through ``hooked_model`` (default ``model``), whose
    same-named modules are observed. ``lora_config.corda_config.cache_file`` (the decompositions, as
    HF PEFT writes them: ``{"<module>.eigens.S_WC": ...}``) and ``covariance_file``
    (``{"<module>": covariance}``) are loaded when they exist, else written."""
    settings = corda_settings(lora_config.corda_config)
    targets = _targets(model, lora_config)
    cached = load_tensors(settings.cache_file)
    if cached is not None:
        for name, module in targets.items():
            fields = {f: cached.get(f"{name}.eigens.{f}") for f in ("S_WC", "U_WC", "V_WC")}
            if any(v is None for v in fields.values()):
                raise CordaError(f"preprocess_corda: cache_file {settings.cache_file!r} has no decomposition for {name!r}")
            module.eigens = CordaEigens(**{f: v.to(module.weight.device) for f, v in fields.items()})
        return
    covariances = load_tensors(settings.covariance_file)
    if covariances is None:
        if run_model is None:
            raise CordaError("run_model must be specified when covariance file and cache file aren't built.")
        covariances = _collect_covariances(targets, hooked_model or model, run_model, settings)
        save_tensors({name: c.cpu() for name, c in covariances.items()}, settings.covariance_file)
    bar = tqdm(targets.items(), desc="CorDA decomposition", disable=not settings.verbose, unit="layer")
    for name, module in bar:
        if name not in covariances:
            raise CordaError(f"preprocess_corda: covariance_file {settings.covariance_file!r} has no covariance "
                             f"for {name!r}")
        covariance = covariances[name].to(module.weight.device)
        rank = pattern_value(lora_config.rank_pattern, name, lora_config.r)
        module.eigens = decompose(_weight(module), covariance, rank, settings.corda_method)
        if not settings.prune_temporary_fields:
            module.covariance_matrix, module.corda_method, module.rank = covariance, settings.corda_method, rank
        elif hasattr(module, "sample_count"):
            del module.sample_count
    save_tensors({f"{name}.eigens.{f.name}": getattr(module.eigens, f.name).cpu()
           for name, module in targets.items() for f in dataclasses.fields(CordaEigens)}, settings.cache_file)


@torch.no_grad()
def initialize(layer: LoraLayer, adapter_name: str) -> None:
    """Write the adapter from the decomposition :func:`preprocess_corda` left on ``layer``'s base
    layer, rewrite the base weight to the residual and drop the decomposition."""
    from peft_kernel_lora.init import write_factors
    from peft_kernel_lora.layers import Linear

    base = layer.base_layer
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise CordaError("`eigens` attribute not found for layer, please run `preprocess_corda` first.")
    if not isinstance(layer, Linear):
        raise UnsupportedFeatureError("init_lora_weights='corda' supports nn.Linear and Conv1D layers only")
    rank, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    if eigens.S_WC.shape[0] != rank:
        raise CordaError(f"preprocess_corda decomposed this layer to rank {eigens.S_WC.shape[0]}, but the adapter "
                         f"has r={rank}: run preprocess_corda with the same LoraConfig")
    root = torch.sqrt(eigens.S_WC.to(torch.float32) / scaling)
    a = root[:, None] * eigens.V_WC.to(torch.float32).T
    b = eigens.U_WC.to(torch.float32) * root[None, :]
    write_factors(layer, adapter_name, a, b, layer.base_weight().detach().to(torch.float32))
    del base.eigens
