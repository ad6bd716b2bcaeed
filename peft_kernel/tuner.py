"""``AdapterModel``: the model with adapters injected (HF PEFT's ``LoraModel``, ``IA3Model``...).

``PeftModel.base_model`` is one of these; ``.model`` is the user's transformers model. It owns
the adapter lifecycle: add, activate, disable, delete, merge, unload. Each method gets a subclass
named after its record's ``tuner_name`` so ``type(peft_model.base_model).__name__`` reads as in
HF PEFT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from functools import lru_cache
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from peft_kernel import parameter_targets
from peft_kernel.adapter_io import HOST_KEY_PREFIX, LoadResult, layer_state_dict, load_layer_state_dict
from peft_kernel.call_scope import call_scope
from peft_kernel.errors import AdapterNameError, UnknownMethodError
from peft_kernel.injection import (
    cast_adapter_dtype,
    check_adapter_name,
    inject,
    replace_with_base,
    set_requires_grad,
    set_trainable,
    settle_new_adapter,
)
from peft_kernel.layer import AdapterLayer, adapter_layers, walk_modules
from peft_kernel.modules_to_save import ModulesToSaveWrapper
from peft_kernel.plugins import get_registry, import_object
from peft_kernel.routing import tasks_routed


_DUMMY_MODEL_CONFIG = {"model_type": "custom"}


def merge_all(layers: Iterable[AdapterLayer], safe_merge: bool, adapter_names: list[str] | None) -> None:
    """Merge every layer, or none: a layer that refuses (``safe_merge`` finding NaNs, a method that
    cannot merge there) makes the layers merged before it in this call unmerge again."""
    fold = get_registry().merge
    done: list[tuple[AdapterLayer, int]] = []
    try:
        for layer in layers:
            done.append((layer, len(layer.merged_adapters)))
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names, fold=fold)
    except BaseException:
        for layer, before in reversed(done):
            while len(layer.merged_adapters) > before:
                fold(layer, layer.merged_adapters.pop(), False, "unmerge")
        raise


def is_additive(layer: AdapterLayer) -> bool:
    """Whether ``layer``'s method declares the ``additive`` capability and the layer implements
    ``delta_weight``: its adapters are ``W' = W + ΔW`` and can be rewritten as a LoRA."""
    if type(layer).delta_weight is AdapterLayer.delta_weight:
        return False
    try:
        return get_registry().method(layer.peft_type).supports("additive")
    except UnknownMethodError:  # a layer of no registered method (built by hand): nothing vouches for it
        return False


class AdapterModel(nn.Module):
    """A transformers (or any torch) model with adapters of one method injected."""

    tuner_layer_cls: type[AdapterLayer] = AdapterLayer
    """The class every adapter layer of this tuner derives from (HF PEFT's ``LoraLayer``...)."""
    takes_task_ids: bool = False
    """Whether the method's layers read per-row ``task_ids`` (its record's ``task_ids`` capability, set
    when the first adapter is injected): ``PeftModel``'s task classes then hand them on, and
    :meth:`serve` publishes them for the layers (``peft_kernel.routing.current_task_ids``)."""

    call_keywords: frozenset[str] = frozenset()
    """The method's record's ``call_keywords``, taken out of ``forward`` / ``generate`` and published
    for the call (:mod:`peft_kernel.call_scope`)."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: Any,
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []
        self.peft_config: dict[str, Any] = {}
        self._active: list[str] = [adapter_name]
        config = peft_config[adapter_name] if isinstance(peft_config, dict) else peft_config
        self._inject(adapter_name, config, state_dict)
        # from the adapter's own method (a mixed model has no single record)
        record = get_registry().method_for_config(config)
        self.takes_task_ids = record.supports("task_ids")
        self.call_keywords = record.call_keywords

    # ---- HF PEFT names ----------------------------------------------------------------------
    @property
    def uses_shared_state(self) -> bool:
        """HF PEFT's flag: the adapters have model-level shared tensors (VeRA's projections, VB-LoRA's
        bank: layers with ``shared_tensor_names``). HF's ``RandLoraModel`` says ``False`` although its
        bases are shared too."""
        return any(layer.shared_tensor_names for _, layer in adapter_layers(self.model))

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def prefix(self) -> str:
        return self._record().prefix

    @property
    def target_module_mapping(self) -> dict[str, list[str]]:
        """Default ``target_modules`` per transformers ``model_type`` (from the method's record)."""
        return dict(self._record().default_target_modules)

    def _record(self) -> Any:
        config = next(iter(self.peft_config.values()))
        return get_registry().method_for_config(config)

    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        """``model.config`` as a dict (``{"model_type": "custom"}`` for a model without one), as HF PEFT."""
        config = getattr(model, "config", _DUMMY_MODEL_CONFIG)
        if hasattr(config, "to_dict"):
            return config.to_dict()
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            return dataclasses.asdict(config)
        return dict(config) if isinstance(config, dict) else config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._tasks(kwargs), call_scope("forward", args, kwargs, self.call_keywords):
            return self.model(*args, **kwargs)

    # ---- the adapter-host protocol (peft_kernel.host.AdapterHost) ------------------------------
    @property
    def plain_model(self) -> nn.Module:
        return self.model

    def _tasks(self, kwargs: dict) -> contextlib.AbstractContextManager[Any]:
        """``task_ids`` taken out of ``kwargs`` and published for the layers, for methods that take them."""
        if not self.takes_task_ids:
            return contextlib.nullcontext()
        return tasks_routed(kwargs.pop("task_ids", None))

    def serve(self, args: tuple, kwargs: dict, adapter_names: Any) -> Any:
        """Forward; mixed-batch routing is already published by ``PeftModel`` for the layers."""
        with self._tasks(kwargs), call_scope("forward", args, kwargs, self.call_keywords):
            return self.model(*args, **kwargs)

    def serves_compiled(self, kwargs: dict) -> bool:
        """Whether :meth:`serve_compiled` can run this call: nothing to publish to the layers
        (no ``task_ids``, none of the method's ``call_keywords``)."""
        if self.takes_task_ids and kwargs.get("task_ids") is not None:
            return False
        return not any(k in kwargs for k in self.call_keywords)

    def serve_compiled(self, args: tuple, kwargs: dict) -> Any:
        """The forward Dynamo traces (see :mod:`peft_kernel.compiled`): no context variables."""
        if self.takes_task_ids:
            kwargs.pop("task_ids", None)
        return self.model(*args, **kwargs)

    def serve_generate(self, args: tuple, kwargs: dict, adapter_names: Any) -> Any:
        with self._tasks(kwargs), call_scope("generate", args, kwargs, self.call_keywords):
            return self.model.generate(*args, **kwargs)

    def release(self) -> None:
        """Give the user's model back as it came (used when loading fails): unlike ``unload``, a
        ``modules_to_save`` wrapper gives back its original module, not the trained copy."""
        for _, layer in adapter_layers(self.model):
            layer.unmerge(fold=get_registry().merge)
        replace_with_base(self.model, keep_trained_copies=False)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._tasks(kwargs), call_scope("generate", args, kwargs, self.call_keywords):
            return self.model.generate(*args, **kwargs)

    def attach(self, peft_model: nn.Module) -> None:
        """The tuner is the ``PeftModel``'s ``base_model`` (HF PEFT's ``LoraModel``...)."""
        peft_model.base_model = self

    def settle_loaded(self, adapter_name: str) -> None:
        """An active adapter whose weights were just loaded takes its trainability from its config."""
        if self.active_adapters == [adapter_name]:
            self._activate(adapter_name, None)

    def saved_tensors(self, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None,
                      save_embedding_layers: str | bool = "auto") -> dict[str, torch.Tensor]:
        """The adapter's tensors, detached, under on-disk keys (``base_model.model.<module>...``)."""
        return layer_state_dict(self, adapter_name, state_dict, save_embedding_layers, prefix=HOST_KEY_PREFIX)

    def load_tensors(self, tensors: dict[str, torch.Tensor], adapter_name: str,
                     ignore_mismatched_sizes: bool = False) -> LoadResult:
        """Copy on-disk-keyed tensors into the adapter's layers and ``modules_to_save`` copies."""
        return load_layer_state_dict(self, tensors, adapter_name, ignore_mismatched_sizes, prefix=HOST_KEY_PREFIX)

    # ---- lifecycle --------------------------------------------------------------------------
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, Any] | None = None,
    ) -> None:
        """HF PEFT's ``inject_adapter``: inject the adapter whose config is already in
        ``self.peft_config[adapter_name]``. ``autocast_adapter_dtype`` is accepted and, as in HF
        PEFT, not applied here (``PeftModel`` upcasts); ``state_dict`` (keys only) picks the
        modules to adapt, for checkpoints without reliable ``target_modules``."""
        if model is not self.model:
            raise ValueError("inject_adapter(model, ...) injects into this tuner's own model (self.model).")
        if adapter_name not in self.peft_config:
            raise AdapterNameError(
                f"inject_adapter({adapter_name!r}) reads the config from self.peft_config[{adapter_name!r}], which is "
                "not there; use add_adapter(adapter_name, peft_config) to add a new adapter."
            )
        config = self.peft_config.pop(adapter_name)
        try:
            self._inject(adapter_name, config, state_dict)
        except BaseException:
            self.peft_config.setdefault(adapter_name, config)
            raise

    def _inject(self, adapter_name: str, peft_config: Any, state_dict: dict[str, Any] | None = None) -> None:
        registry = get_registry()
        check_adapter_name(adapter_name, self.peft_config, registry, peft_config)
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if registry.method_for_config(first).peft_type != registry.method_for_config(peft_config).peft_type:
                raise AdapterNameError(
                    f"this model holds {registry.method_for_config(first).peft_type} adapters; a "
                    f"{registry.method_for_config(peft_config).peft_type} adapter cannot join them in one model."
                )
        parameter_targets.check_same_parameters(peft_config, self.peft_config)
        targeted = inject(self.model, peft_config, adapter_name, registry, state_dict_keys=state_dict)
        self.targeted_module_names.extend(n for n in targeted if n not in self.targeted_module_names)
        self.targeted_parameter_names.extend(n for n in parameter_targets.targeted_parameter_names(self.model, adapter_name)
                                             if n not in self.targeted_parameter_names)
        self.peft_config[adapter_name] = peft_config
        if adapter_name in self._active:
            set_trainable(self.model, self._active, self.peft_config)
        else:  # an extra, inactive adapter: only its own tensors need settling
            settle_new_adapter(self.model, adapter_name)

    def add_adapter(self, adapter_name: str, peft_config: Any) -> None:
        self._inject(adapter_name, peft_config)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        cast_adapter_dtype(self.model, adapter_name, autocast_adapter_dtype)

    def _check_names(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNameError(f"unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}.")

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several at once (their outputs add up). As in HF PEFT they
        become trainable, or frozen with ``inference_mode=True``, whatever their config says."""
        self._activate(adapter_name, inference_mode)

    def _activate(self, adapter_name: str | list[str], inference_mode: bool | None) -> None:
        """``set_adapter``; ``inference_mode=None`` freezes what each config's ``inference_mode`` says
        (how loading settles adapters)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        for _, layer in adapter_layers(self.model):
            if layer.merged:
                layer.unmerge(fold=get_registry().merge)
        self._active = names
        set_trainable(self.model, names, self.peft_config, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients of the given adapters' tensors (and ``modules_to_save`` copies) on or off."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        set_requires_grad(self.model, names, requires_grad)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether every adapter layer is additive (``W' = W + delta_weight``), which is what a
        conversion to LoRA needs. A layer may answer itself with ``supports_lora_conversion()``."""
        for _, layer in adapter_layers(self.model):
            own = getattr(type(layer), "supports_lora_conversion", None)
            if own is not None:
                if not layer.supports_lora_conversion(adapter_name):
                    return False
            elif not is_additive(layer):
                return False
        return True

    def _adapter_modules(self) -> Iterator[AdapterLayer | ModulesToSaveWrapper]:
        for _, module in walk_modules(self.model, stop=(ModulesToSaveWrapper,)):
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield module

    def enable_adapter_layers(self) -> None:
        """Enable every adapter layer again. As in HF PEFT this also makes the layers' active
        adapters (and their ``modules_to_save`` copies) trainable, even ones loaded for inference."""
        for module in self._adapter_modules():
            module.enable_adapters(True)
            if isinstance(module, AdapterLayer):
                module.set_adapter(module.active_adapters)
            elif module.active_adapter is not None:
                module.modules_to_save[module.active_adapter].requires_grad_(True)

    def disable_adapter_layers(self) -> None:
        for name in self._active:
            bias = getattr(self.peft_config.get(name), "bias", "none")
            if bias != "none":  # HF PEFT's warning: the trained biases stay in the base layers
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.", stacklevel=2)
        for module in self._adapter_modules():  # HF PEFT also freezes every adapter while disabled
            module.enable_adapters(False)
            if isinstance(module, AdapterLayer):
                module.freeze_adapters()
            else:
                module.modules_to_save.requires_grad_(False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_names([adapter_name])
        for module in self._adapter_modules():
            module.delete_adapter(adapter_name)
        config = self.peft_config.pop(adapter_name)
        get_registry().release_config(config, self.model, list(self.peft_config.values()))
        remaining = [a for a in self._active if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self._active = remaining
        set_trainable(self.model, self._active, self.peft_config)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: int | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of ``adapters`` (HF PEFT's
        ``add_weighted_adapter``). How tensors combine is the method's (``peft_kernel_combine_adapters``
        hook): LoRA offers ``svd``/``linear``/``cat``/``ties``/``dare_*``/``magnitude_prune*``, IA3 a
        linear combination. The new adapter is frozen and not activated; as in HF PEFT, an existing
        ``adapter_name`` leaves everything unchanged. See ``docs/merging.md``."""
        if adapter_name in self.peft_config:
            return
        adapters = list(adapters)
        for name in adapters:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} does not exist")
        if not adapters:
            raise ValueError(f"Found no adapter matching the names in {adapters}")
        if len(weights) != len(adapters):
            raise ValueError(f"add_weighted_adapter needs one weight per adapter: {len(adapters)} adapters, "
                             f"{len(weights)} weights.")
        shared = [m for m in self._adapter_modules() if isinstance(m, ModulesToSaveWrapper)
                  and sum(name in m.modules_to_save for name in adapters) > 1]
        if shared:
            raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                             f"found {len(shared)} such instance(s).")
        registry = get_registry()
        configs = [self.peft_config[name] for name in adapters]
        options = dict(svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                       svd_driver=svd_driver, density=density, majority_sign_method=majority_sign_method)
        plan = registry.combine_adapters(configs[0], adapters, configs, [float(w) for w in weights],
                                         combination_type, options)
        if plan is None:
            from peft_kernel.errors import UnsupportedFeatureError

            raise UnsupportedFeatureError(
                f"{registry.method_for_config(configs[0]).peft_type} adapters cannot be combined: its plugin does not "
                "implement peft_kernel_combine_adapters (add_weighted_adapter)."
            )
        new_config, fill = plan
        self._inject(adapter_name, new_config)
        try:
            for _, layer in adapter_layers(self.model):
                if adapter_name in layer.adapter_names():
                    fill(layer, adapter_name)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    # ---- merging ----------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if adapter_names is not None:
            self._check_names(adapter_names)
        merge_all([layer for _, layer in adapter_layers(self.model)], safe_merge, adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in adapter_layers(self.model):
            layer.unmerge(fold=get_registry().merge)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the active (or given) adapters into the base weights and return the plain model."""
        if adapter_names is not None:
            self._check_names(adapter_names)
        layers = [layer for _, layer in adapter_layers(self.model)]
        merge_all(tqdm(layers, disable=not progressbar, desc="Unloading and merging model"), safe_merge, adapter_names)
        return self._released(replace_with_base(self.model, keep_trained_copies=True))

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model.

        As in HF PEFT, a ``modules_to_save`` module (a classifier head) is replaced by the active
        adapter's trained copy, not by the original: ``unload`` and ``merge_and_unload`` differ only in
        whether the adapter layers are merged. A wrapper whose copies all belong to inactive adapters
        gives back its original module."""
        for _, layer in adapter_layers(self.model):
            layer.unmerge(fold=get_registry().merge)
        return self._released(replace_with_base(self.model, keep_trained_copies=True))

    def _released(self, model: nn.Module) -> nn.Module:
        """``model`` after every adapter's ``peft_kernel_release_config`` (it is the plain model now)."""
        for config in self.peft_config.values():
            get_registry().release_config(config, model, [])
        return model


def tuner_class(name: str, mixin: str = "") -> type[AdapterModel]:
    """A subclass of :class:`AdapterModel` named after a method (``LoraModel``), with the methods of
    the record's ``tuner_mixin`` class (``"package.module:Class"``) where it names one; one class
    per ``(name, mixin)`` (the cache below sees both positionally, so ``tuner_class("X")`` and
    ``tuner_class("X", "")`` are the same class)."""
    return _tuner_class(name, mixin)


@lru_cache(maxsize=None)
def _tuner_class(name: str, mixin: str) -> type[AdapterModel]:
    bases = (AdapterModel,) if not mixin else (import_object(mixin), AdapterModel)
    return type(name or "AdapterModel", bases, {"__module__": __name__})
