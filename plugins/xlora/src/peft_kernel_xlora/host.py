"""``XLoraModel``: the adapter host of an X-LoRA ``PeftModel`` (``peft_model.base_model``, as in HF PEFT).

It holds ``lora_model`` (a LoRA tuner with the experts ``"0"``, ``"1"``..., all active) and
``internal_xlora_classifier``. Each forward of the model (also each step of ``generate``) runs
twice: a scaling pass (every expert at ``scaling_pass_value``, no gradients) gives the classifier
the last hidden state; its scalings, after top-k and ``global_scaling_weight``, are published as
the core's per-token :class:`~peft_kernel.routing.AdapterMix`, which every expert layer applies in
the real pass. Forward pre/post hooks on the transformers model run the scaling pass, so
``generate`` gets it at every step, as in HF PEFT.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from peft_kernel.plugin_api import (
    AdapterMix,
    CheckpointError,
    ConfigError,
    LoadResult,
    MixedBatchError,
    PeftConfig,
    UnsupportedFeatureError,
    adapter_mix,
)
from peft_kernel_xlora.classifier import XLoraClassifier, expert_weights
from peft_kernel_xlora.config import XLoraConfig
from peft_kernel_xlora.experts import expert_layers, load_experts
from peft_kernel_xlora.scalings_api import ScalingsApi
from peft_kernel_xlora.scaling_pass import ScalingPass, cache_of

CLASSIFIER = "internal_xlora_classifier"
KEY_PREFIX = f"base_model.{CLASSIFIER}."
"""On-disk keys of the classifier, relative to the ``PeftModel`` (HF PEFT's)."""
LORA_PREFIX, LORA_DISK_PREFIX = "base_model.lora_model.", "base_model."


class XLoraModel(ScalingsApi, nn.Module):
    """A mixture of LoRA experts gated per token by a classifier (HF PEFT's ``XLoraModel``)."""

    def __init__(self, model: nn.Module, config: XLoraConfig, adapter_name: str) -> None:
        super().__init__()
        _check_model(model, config)
        self.xlora_config = config
        self.adapter_name = adapter_name
        self.experts = [str(i) for i in range(len(config.adapters))]
        self.internal_xlora_scalings: torch.Tensor | None = None
        self._scaling_pass = ScalingPass()
        self._disabled = False
        self._in_scaling_pass = False
        self._scalings_log: list[torch.Tensor] = []
        self.lora_model = load_experts(model, config)
        try:
            self._layers = {layer: i for i, layer in enumerate(expert_layers(model))}
            weight = next((p for p in model.parameters() if p.is_floating_point()), None)
            self.internal_xlora_classifier = XLoraClassifier(config, len(self.experts), len(self._layers)).to(
                device=None if weight is None else weight.device, dtype=None if weight is None else weight.dtype)
            self._set_trainable(not config.inference_mode)
        except BaseException:
            self.lora_model.release()
            raise

    def __getattr__(self, name: str) -> Any:
        """Attributes of the LoRA tuner and, through it, of the transformers model (``config``...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "lora_model":
                raise
            return getattr(self.lora_model, name)

    # ---- the AdapterHost protocol: adapters -----------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """The X-LoRA config and, as in HF PEFT, the experts' LoRA configs."""
        return {self.adapter_name: self.xlora_config, **self.lora_model.peft_config}

    @property
    def active_adapter(self) -> str:
        return self.adapter_name

    @property
    def active_adapters(self) -> list[str]:
        return self.lora_model.active_adapters

    @property
    def plain_model(self) -> nn.Module:
        return self.lora_model.plain_model

    def attach(self, peft_model: nn.Module) -> None:
        peft_model.base_model = self

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        raise UnsupportedFeatureError("an X-LoRA model holds one X-LoRA adapter; its LoRA experts come from "
                                      "XLoraConfig.adapters when the model is created")

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        if adapter_name != self.adapter_name:
            raise UnsupportedFeatureError(f"an X-LoRA model mixes all of its experts; there is no adapter to switch "
                                          f"to besides {self.adapter_name!r}")
        self._set_trainable(not inference_mode)

    def settle_loaded(self, adapter_name: str) -> None:
        self._set_trainable(not self.xlora_config.inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if self.adapter_name in names:
            self.internal_xlora_classifier.requires_grad_(requires_grad)
        experts = [n for n in names if n != self.adapter_name]
        if experts:
            self.lora_model.set_requires_grad(experts, requires_grad)

    def _set_trainable(self, trainable: bool) -> None:
        """The classifier trains; the experts too with ``use_trainable_adapters``."""
        self.internal_xlora_classifier.requires_grad_(trainable)
        self.lora_model.set_requires_grad(self.experts, trainable and self.xlora_config.use_trainable_adapters)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def delete_adapter(self, adapter_name: str) -> None:
        raise UnsupportedFeatureError("the experts and the classifier of an X-LoRA model cannot be deleted; "
                                      "unload() gives the base model back")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        layers = list(self._layers)
        was = [layer.disable_adapters for layer in layers]
        self._disabled = True
        try:
            for layer in layers:
                layer.enable_adapters(False)
            yield
        finally:
            self._disabled = False
            for layer, disabled in zip(layers, was):
                layer.enable_adapters(not disabled)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise _merge_refusal()

    def unmerge_adapter(self) -> None:
        raise _merge_refusal()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        raise _merge_refusal()

    def unload(self) -> nn.Module:
        """Remove the experts and return the base model."""
        self._layers = {}
        return self.lora_model.unload()

    def release(self) -> None:
        self.lora_model.release()

    # ---- forward ----------------------------------------------------------------------------------
    def serve(self, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None) -> Any:
        self._refuse_mixed_batch(adapter_names)
        with self._gated():
            return self.plain_model(*args, **kwargs)

    def serve_generate(self, args: tuple, kwargs: dict, adapter_names: Sequence[str] | None) -> Any:
        self._refuse_mixed_batch(adapter_names)
        with self._gated():
            return self.plain_model.generate(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.serve(args, kwargs, None)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.serve_generate(args, kwargs, None)

    @staticmethod
    def _refuse_mixed_batch(adapter_names: Sequence[str] | None) -> None:
        if adapter_names is not None:
            raise MixedBatchError("X-LoRA mixes its experts per token itself; adapter_names is not supported")

    @contextlib.contextmanager
    def _gated(self) -> Iterator[None]:
        """Hooks that give every forward of the model (each ``generate`` step too) its scaling pass."""
        if self._disabled:
            yield
            return
        model, pending = self.plain_model, []

        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._in_scaling_pass:
                return
            mix, own_cache = self._scalings_mix(args, kwargs)
            context = adapter_mix(mix)
            context.__enter__()
            pending.append((context, own_cache))

        def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._in_scaling_pass or not pending:
                return
            context, own_cache = pending.pop()
            context.__exit__(None, None, None)
            self._scaling_pass.pair(cache_of(output)[1], own_cache)

        handles = [model.register_forward_pre_hook(before, with_kwargs=True),
                   model.register_forward_hook(after, with_kwargs=True, always_call=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _scalings_mix(self, args: tuple, kwargs: dict) -> tuple[AdapterMix, Any]:
        """Run the scaling pass and the classifier; the mix of the real pass and the scaling pass's cache."""
        self._refuse_recomputation()
        value = self.xlora_config.scaling_pass_value
        device = self.internal_xlora_classifier.layers[0].weight.device
        # as in HF PEFT, the scaling pass's constant scalings go through top-k and the global weight too
        constant = expert_weights(torch.full((len(self.experts),), float(value), device=device), self.xlora_config)
        self._in_scaling_pass = True
        try:
            hidden, own_cache = self._scaling_pass.hidden_states(
                self.plain_model, args, kwargs, AdapterMix(self.experts, lambda layer: constant))
        finally:
            self._in_scaling_pass = False
        scalings = self.internal_xlora_classifier(hidden)
        self._record_scalings(scalings)
        weights = expert_weights(scalings, self.xlora_config)
        layers = self._layers
        return AdapterMix(self.experts, lambda layer: _layer_slice(weights, layers.get(layer))), own_cache

    def _refuse_recomputation(self) -> None:
        """Activation checkpointing recomputes layers in the backward pass, after the mix of the forward
        is gone: their experts' weights would differ from the forward's."""
        model = self.plain_model
        if model.training and torch.is_grad_enabled() and getattr(model, "is_activation_checkpointing", False):
            raise UnsupportedFeatureError("X-LoRA does not support training with gradient (activation) "
                                          "checkpointing; call model.gradient_checkpointing_disable()")

    # ---- tensors saved and loaded ---------------------------------------------------------------
    def saved_tensors(self, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None,
                      save_embedding_layers: str | bool = "auto") -> dict[str, torch.Tensor]:
        """The classifier under ``base_model.internal_xlora_classifier.*`` for the X-LoRA adapter; an
        expert's LoRA tensors under plain LoRA keys (``base_model.model.<module>...``) for the others."""
        if adapter_name == self.adapter_name:
            if state_dict is not None:
                return {k: v.detach() for k, v in state_dict.items() if k.startswith(KEY_PREFIX)}
            return {KEY_PREFIX + k: v.detach() for k, v in self.internal_xlora_classifier.state_dict().items()}
        if state_dict is not None:
            state_dict = {LORA_DISK_PREFIX + k[len(LORA_PREFIX):]: v for k, v in state_dict.items()
                          if k.startswith(LORA_PREFIX)}
        return self.lora_model.saved_tensors(adapter_name, state_dict, save_embedding_layers)

    def load_tensors(self, tensors: dict[str, torch.Tensor], adapter_name: str,
                     ignore_mismatched_sizes: bool = False) -> LoadResult:
        if adapter_name != self.adapter_name:
            return self.lora_model.load_tensors(tensors, adapter_name, ignore_mismatched_sizes)
        own = {KEY_PREFIX + k: v for k, v in self.internal_xlora_classifier.state_dict().items()}
        unknown = sorted(set(tensors) - set(own))
        missing = sorted(set(own) - set(tensors))
        wrong = sorted(k for k in set(own) & set(tensors) if tensors[k].shape != own[k].shape)
        if unknown or missing or wrong:
            raise CheckpointError(
                f"the X-LoRA checkpoint does not fit the classifier ({self.xlora_config.xlora_depth} layers, "
                f"{len(self.experts)} experts, {len(self._layers)} LoRA layers): unknown keys {unknown[:8]}, "
                f"missing keys {missing[:8]}, wrong shapes {[(k, tuple(tensors[k].shape)) for k in wrong[:8]]}")
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(tensors[key])
        return LoadResult([], [])


def _merge_refusal() -> NotImplementedError:
    return NotImplementedError("X-LoRA weights its experts per token with scalings computed from each input; "
                               "they cannot be merged into the base weights")


def _layer_slice(weights: torch.Tensor, index: int | None) -> torch.Tensor | None:
    return None if index is None else weights[:, :, index, :]


def _check_model(model: nn.Module, config: XLoraConfig) -> None:
    """X-LoRA's classifier reads a transformers model's hidden states, of ``config.hidden_size``."""
    if getattr(model, "config", None) is None:
        raise UnsupportedFeatureError(f"X-LoRA needs a transformers model (its classifier reads the hidden states); "
                                      f"{type(model).__name__} has no model config")
    size = getattr(model.config, "hidden_size", None)
    if size is not None and size != config.hidden_size:
        raise ConfigError(f"XLoraConfig.hidden_size is {config.hidden_size} but the model's hidden size is {size}")
