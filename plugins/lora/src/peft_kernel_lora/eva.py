"""EVA initialisation (``init_lora_weights="eva"``): LoRA's A from the principal directions of each
targeted layer's inputs on calibration data, ranks redistributed by explained variance, B zero.

:func:`get_eva_state_dict` runs the model on ``dataloader`` (cycled until every layer has
converged), feeding each layer's inputs (positions kept by the attention mask and, with
``use_label_mask``, by the labels) into an :class:`~peft_kernel_lora.eva_pca.IncrementalPCA` of
``round(r * rho)`` directions. A layer has converged when its leading directions (as many as its current
share of the rank budget, recomputed after every batch) moved less than ``tau`` (cosine) in one step. Layers fed the very same inputs (q/k/v projections) are
decomposed once (the twin counting that layer's ratios again); all layers share ``r`` per layer,
the largest explained variance ratios across all of them winning. :func:`initialize_lora_eva_weights` resizes each
adapter to its rank (``rank_pattern``; ``alpha_pattern`` keeps ``lora_alpha / r`` with
``adjust_scaling_factors``) and writes the directions into A (``whiten``: each divided by the square
root of its singular value).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from tqdm import tqdm

from peft_kernel.plugin_api import UnsupportedFeatureError, pattern_value, standard_match
from peft_kernel_lora.config import LoraConfig
from peft_kernel_lora.eva_config import EvaConfig, eva_settings
from peft_kernel_lora.eva_pca import IncrementalPCA

PEFT_PREFIX = "base_model.model."
logger = logging.getLogger(__name__)


def forward_fn_dict(model: nn.Module, inputs: dict) -> Any:
    """The default forward: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: dict, peft_config: LoraConfig) -> torch.Tensor:
    """The positions whose inputs count: the attention mask, minus (``use_label_mask``) those
    labelled ``label_mask_value``."""
    settings = eva_settings(peft_config.eva_config or {})
    ids = model_input["input_ids"]
    mask = model_input.get("attention_mask", torch.ones_like(ids)).bool()
    labels = model_input.get("labels")
    if settings.use_label_mask and labels is not None:
        mask = mask & (labels != settings.label_mask_value)
    return mask


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str) -> torch.Tensor:
    """The layer's input rows at the kept positions (``model_input`` is the mask), as [rows, features]."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if layer_input.shape[: model_input.dim()] != model_input.shape:
        raise ValueError(
            f"EVA: the inputs of layer {layer_name!r} have shape {tuple(layer_input.shape)}, which does not start with "
            f"the token mask's {tuple(model_input.shape)}; leave this layer out of target_modules or pass a "
            "prepare_layer_inputs_fn for it"
        )
    return layer_input[model_input]


def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Optional[LoraConfig] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """``{module name: A rows}`` for every layer ``peft_config`` targets (the PeftModel's config when
    ``model`` is one); each tensor is [rank, in_features] with the layer's redistributed rank."""
    if peft_config is None:
        configs = getattr(model, "peft_config", None)
        if not configs or adapter_name not in configs:
            raise ValueError("get_eva_state_dict needs peft_config when model is not a PeftModel "
                             f"with adapter {adapter_name!r}")
        peft_config = configs[adapter_name]
    settings = eva_settings(peft_config.eva_config or {})
    if gather_distributed_inputs and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise UnsupportedFeatureError("get_eva_state_dict does not gather layer inputs across processes yet; pass "
                                      "gather_distributed_inputs=False to decompose each process's own batches")
    targets = _targets(model, peft_config, adapter_name)
    if not targets:
        raise ValueError("get_eva_state_dict: no layer of the model is targeted by the LoRA config")
    collector = _Collector(model, targets, peft_config, settings, forward_fn, prepare_model_inputs_fn,
                           prepare_layer_inputs_fn)
    with _calibration(model):
        collector.run(dataloader, show_progress_bar)
    return collector.state_dict()


def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    eva_state_dict: Optional[dict] = None,
    forward_fn: Optional[Callable] = forward_fn_dict,
    prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None] = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Resize every LoRA layer of ``adapter_name`` to its EVA rank and set A from the data (B zero);
    the ranks go into the config's ``rank_pattern`` (and ``alpha_pattern``), so the adapter saves
    and loads as a plain LoRA adapter."""
    config = model.peft_config[adapter_name]
    if config.init_lora_weights != "eva":
        raise ValueError("`init_lora_weights` must be 'eva' to initialize the LoRA weights with EVA, got "
                         f"{config.init_lora_weights!r}")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar)
    settings = eva_settings(config.eva_config or {})
    layers = _targets(model, config, adapter_name)
    missing = [name for name in layers if _components(eva_state_dict, name) is None]
    if missing:
        raise KeyError(f"eva_state_dict has no entry for the LoRA layers {missing}")
    rank_pattern, alpha_pattern = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    kept = []
    for name, layer in layers.items():
        key, rank = _short(name), _components(eva_state_dict, name).shape[0]
        r = pattern_value(config.rank_pattern, key, config.r)
        if rank == 0:  # HF PEFT drops the adapter from layers that got no rank
            _drop(model, name, layer, adapter_name)
            continue
        kept.append(key)
        if rank != r:
            rank_pattern[key] = rank
            if settings.adjust_scaling_factors:
                alpha_pattern[key] = pattern_value(config.alpha_pattern, key, config.lora_alpha) * rank / r
    config.rank_pattern, config.alpha_pattern, config.target_modules = rank_pattern, alpha_pattern, kept
    for name, layer in layers.items():
        key, components = _short(name), _components(eva_state_dict, name)
        if key not in kept:
            continue
        layer.update_layer(adapter_name, config, key)
        with torch.no_grad():
            lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            lora_a.copy_(components.to(device=lora_a.device, dtype=lora_a.dtype))
            lora_b.zero_()
    if hasattr(model, "set_adapter") and adapter_name in getattr(model, "active_adapters", [adapter_name]):
        model.set_adapter(adapter_name)
    return model


def _components(eva_state_dict: dict, name: str) -> Optional[torch.Tensor]:
    """A layer's rows in ``eva_state_dict`` (keyed by the PeftModel's module names or the base model's)."""
    return eva_state_dict.get(name, eva_state_dict.get(_short(name)))


def _drop(model: nn.Module, name: str, layer: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from ``layer``; a layer left without adapters becomes its base layer again."""
    if layer.adapter_names() == [adapter_name]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    else:
        layer.delete_adapter(adapter_name)


def _short(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _targets(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, nn.Module]:
    """``{full module name: module}`` of the layers to decompose: the LoRA layers holding
    ``adapter_name`` in a PeftModel, else the linear modules ``config`` targets."""
    from peft_kernel_lora.layers import LoraLayer

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    if layers or hasattr(model, "peft_config"):
        for name, layer in layers.items():
            if not hasattr(layer, "in_features") or adapter_name in layer.lora_embedding_A:
                raise UnsupportedFeatureError(f"EVA supports linear layers only, not {name!r} "
                                              f"({type(layer.base_layer).__name__})")
        return layers
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and standard_match(config, n)}


@contextlib.contextmanager
def _calibration(model: nn.Module) -> Any:
    """Eval mode, no gradients, adapters off (the base model's activations) while calibrating."""
    was_training = model.training
    model.eval()
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        with torch.no_grad(), disable:
            yield
    finally:
        model.train(was_training)


class _Collector:
    """Hooks the target layers, feeds their inputs into one incremental PCA per distinct input."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], config: LoraConfig, settings: EvaConfig,
                 forward_fn: Optional[Callable], prepare_model_inputs_fn: Optional[Callable],
                 prepare_layer_inputs_fn: Union[Callable, dict[str, Callable], None]) -> None:
        self.model, self.targets, self.config, self.settings = model, targets, config, settings
        self.forward_fn = forward_fn or forward_fn_dict
        self.prepare_model = prepare_model_inputs_fn
        self.prepare_layer = prepare_layer_inputs_fn
        self.ranks = {n: pattern_value(config.rank_pattern, _short(n), config.r) for n in targets}
        self.pcas: dict[str, IncrementalPCA] = {}
        self.duplicate_of: dict[str, str] = {}
        self.done: set[str] = set()

    def _layer_rows(self, name: str, layer_input: Any, mask: Any) -> torch.Tensor:
        prepare = self.prepare_layer
        if isinstance(prepare, dict):
            prepare = prepare.get(_short(name), prepare.get(name, prepare_layer_inputs_fn_language_modeling))
        if prepare is None:
            rows = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
        else:
            rows = prepare(layer_input, mask, name)
        return rows.reshape(-1, rows.shape[-1]).to(torch.float32)

    def _capture(self, inputs: Any, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """One forward on ``inputs``; the prepared input rows of the layers ``names``."""
        mask = self.prepare_model(inputs, self.config) if self.prepare_model is not None else inputs
        captured: dict[str, torch.Tensor] = {}
        handles = [self.targets[n].register_forward_pre_hook(
            lambda module, args, n=n: captured.__setitem__(n, self._layer_rows(n, args, mask))) for n in names]
        try:
            self.forward_fn(self.model, inputs)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def run(self, dataloader: Iterable, show_progress_bar: bool) -> None:
        """Cycle over ``dataloader`` until every distinct layer's leading directions (as many as its
        current share of the rank budget, recomputed after every batch) have converged; a
        layer whose share grows past its converged directions is fed again."""
        first = next(iter(dataloader), None)
        if first is None:
            raise ValueError("get_eva_state_dict: the dataloader is empty")
        self._find_duplicates(self._capture(first, self.targets))
        for name in self.targets:
            if name not in self.duplicate_of:
                self.pcas[name] = IncrementalPCA(round(self.ranks[name] * self.settings.rho))
        stable = {name: torch.zeros(pca.n_components, dtype=torch.bool) for name, pca in self.pcas.items()}
        bar = tqdm(total=len(self.pcas), desc="EVA: layers converged", disable=not show_progress_bar)
        try:
            for inputs in itertools.cycle(dataloader):
                pending = [n for n in self.pcas if n not in self.done]
                for name, rows in self._capture(inputs, pending).items():
                    pca = self.pcas[name]
                    if rows.shape[0] < pca.n_components:
                        logger.warning("EVA: skipping the batch for %s, which has fewer than %d input rows",
                                       name, pca.n_components)
                        continue
                    pca.update(rows)
                    stable[name] = pca.stable_directions(self.settings.tau)
                shares = self._redistribute()
                for name in self.pcas:
                    if bool(torch.all(stable[name][: shares[name]])):
                        self.done.add(name)
                    else:
                        self.done.discard(name)
                bar.n = len(self.done)
                bar.refresh()
                if len(self.done) == len(self.pcas):
                    break
        finally:
            bar.close()

    def _find_duplicates(self, captured: dict[str, torch.Tensor]) -> None:
        """Layers whose inputs equal an earlier layer's are decomposed once (with that layer)."""
        seen: list[str] = []
        for name in self.targets:
            rows = captured.get(name)
            twin = next((s for s in seen if rows is not None and captured[s].shape == rows.shape
                         and torch.equal(captured[s], rows)), None)
            if twin is None:
                seen.append(name)
            else:
                self.duplicate_of[name] = twin

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The redistributed ranks' leading directions (divided by the square roots of their singular
        values with ``whiten``): distinct layers first, then their twins."""
        ranks = self._redistribute()
        result = {}
        for name, rank in ranks.items():
            pca = self.pcas[self.duplicate_of.get(name, name)]
            rows = pca.components[:rank].clone()
            result[name] = rows / pca.singular_values[:rank, None].sqrt() if self.settings.whiten else rows
        return result

    def _redistribute(self) -> dict[str, int]:
        """The budget ``sum(r)`` of all layers goes to their largest explained variance ratios (a
        twin counts its layer's ratios again; equal ratios go to the earlier layer first)."""
        names = list(self.pcas) + list(self.duplicate_of)
        ratios = [self.pcas[self.duplicate_of.get(n, n)].explained_variance_ratio for n in names]
        owners = torch.cat([torch.full(r.shape, i, dtype=torch.long) for i, r in enumerate(ratios)])
        budget = sum(self.ranks[n] for n in names)
        chosen = owners[torch.argsort(torch.cat(ratios).cpu(), descending=True, stable=True)[:budget]]
        counts = torch.bincount(chosen, minlength=len(names))
        return {n: int(counts[i]) for i, n in enumerate(names)}
