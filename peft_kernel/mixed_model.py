"""``PeftMixedModel``: adapters of different methods in one model (HF PEFT's ``get_peft_model(..., mixed=True)``).

The kernel change is small and generic. A module already wrapped by an adapter layer of another
method gets a new layer of the adding method *stacked* on top (``injection.inject(stack=True)``):
the plugin builds its layer for the plain module, whose ``base_layer`` then becomes the existing
adapter layer. Forward runs the layers below first, so the adapters of every method add up (HF
PEFT nests its layers the same way); merges reach the plain module's weight through the chain.
An adapter of a method already in the chain joins that method's layer instead of adding one more.
In memory a stacked layer sits at ``<module>.base_layer``; on disk each adapter keeps its
single-method keys (``adapter_io.adapter_tensors`` saves a stacked layer under the outer layer's
path), so checkpoints of HF PEFT's ``PeftModel`` load as they are.

Beyond HF PEFT (whose ``PeftMixedModel.save_pretrained`` raises): :meth:`PeftMixedModel.save_pretrained`
writes one sub-folder per adapter in HF's single-method format (each loads in HF PEFT with
``PeftModel.from_pretrained`` or ``PeftMixedModel.load_adapter``) plus ``mixed_adapters.json``
naming the adapters in stacking order and the active ones; :meth:`PeftMixedModel.from_pretrained`
reads it back. Mixed batches (``adapter_names=[...]``) work too: every layer of the chain routes
its own rows. IA3 mixes too (HF PEFT refuses it): it scales what the layers below it give (or its
input, for feedforward modules). ``add_weighted_adapter`` combines adapters of one method (HF's
mixed model raises).

Refused or warned: a layer class may declare ``stack_refusal`` (OFT on a Conv2d runs the rotated
convolution itself, so it cannot sit above another adapter layer; it may sit below); merging a layer
above one whose active adapters stay unmerged warns (exact for additive methods only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from peft_kernel.adapter_io import save_adapter
from peft_kernel.checkpoint import atomic_write_text
from peft_kernel.checkpoint_stage import staged_checkpoint
from peft_kernel.config import PeftConfig
from peft_kernel.errors import AdapterNameError, CheckpointError
from peft_kernel.injection import (
    _set_module, cast_adapter_dtype, check_adapter_name, inject, replace_with_base, set_trainable, settle_new_adapter,
    wrap_modules_to_save,
)
from peft_kernel.layer import AdapterLayer, adapter_layers, walk_modules
from peft_kernel.modules_to_save import ModulesToSaveWrapper
from peft_kernel.model import PeftModel, _gradient_checkpointing
from peft_kernel.plugins import get_registry
from peft_kernel.transaction import wrap_and_load
from peft_kernel.tuner import AdapterModel

MANIFEST_NAME = "mixed_adapters.json"
MANIFEST_FORMAT = "peft-kernel-mixed"


def check_config_compatible(peft_config: PeftConfig) -> None:
    """Layer-adapter methods mix; prompt-learning methods (virtual tokens, no layers) do not."""
    record = get_registry().method_for_config(peft_config)
    if record.supports("prompt_learning"):
        peft_type = getattr(peft_config.peft_type, "value", peft_config.peft_type)
        raise ValueError(
            f"The provided `peft_type` '{peft_type}' is not compatible with the `PeftMixedModel`: only methods that "
            "wrap layers (LoRA, LoHa, LoKr, OFT...) can be mixed, prompt-learning methods cannot."
        )


class MixedModel(AdapterModel):
    """HF PEFT's ``MixedModel``: an :class:`AdapterModel` whose adapters may be of different methods."""

    def _record(self) -> Any:
        raise AttributeError("a mixed model has no single method (record); look at each adapter's config")

    def _inject(self, adapter_name: str, peft_config: Any, state_dict: dict[str, Any] | None = None) -> None:
        registry = get_registry()
        check_config_compatible(peft_config)
        check_adapter_name(adapter_name, self.peft_config, registry, peft_config)
        targeted = inject(self.model, peft_config, adapter_name, registry, state_dict_keys=state_dict, stack=True)
        self.targeted_module_names.extend(n for n in targeted if n not in self.targeted_module_names)
        self.peft_config[adapter_name] = peft_config
        self._refuse_unstackable(adapter_name)
        if adapter_name in self._active:
            set_trainable(self.model, self._active, self.peft_config)
        else:
            settle_new_adapter(self.model, adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args: Any,
                             **kwargs: Any) -> None:
        """Beyond HF PEFT (its ``MixedModel`` raises ``NotImplementedError``): combine adapters of *one*
        method, as :meth:`AdapterModel.add_weighted_adapter` does in a plain model (the method's
        combine hook decides which methods can). Adapters of different methods are refused: their
        tensors have no common form to add up."""
        methods = {}
        for name in adapters:
            if name in self.peft_config:
                peft_type = self.peft_config[name].peft_type
                methods[name] = str(getattr(peft_type, "value", peft_type))
        if len(set(methods.values())) > 1:
            raise ValueError(
                f"add_weighted_adapter combines adapters of one method, got {methods}: adapters of different "
                "methods cannot be combined (convert them to LoRA first with convert_to_lora, then combine the LoRAs)."
            )
        super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)

    def _refuse_unstackable(self, adapter_name: str) -> None:
        """Take ``adapter_name`` out again and raise if it put a layer that declares it cannot wrap
        another adapter layer (``stack_refusal``: it does not run its ``base_layer``) on top of one."""

        for path, layer in adapter_layers(self.model):
            reason = getattr(type(layer), "stack_refusal", None)
            if reason and isinstance(layer._modules.get("base_layer"), AdapterLayer) and adapter_name in layer.adapter_names():
                below = layer.base_layer.peft_type
                self.delete_adapter(adapter_name)
                raise ValueError(f"{layer.peft_type} adapter {adapter_name!r} cannot be stacked on the {below} adapter "
                                 f"layer at {path!r}: {reason}.")

    def _merge_inside_out(self, adapter_names: list[str] | None, safe_merge: bool, progressbar: bool = False) -> None:
        """Merge layers below others first: a layer's forward applies its method to what the layers
        below it produce, so a non-additive outer layer (OFT rotates the weight) must fold in after
        them. (Unmerging in walk order, outer first, then undoes it exactly.)"""
        if adapter_names is not None:
            self._check_names(adapter_names)
        found = list(adapter_layers(self.model))
        layers = [layer for _, layer in found][::-1]
        for layer in tqdm(layers, disable=not progressbar, desc="Unloading and merging model"):
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names, fold=get_registry().merge)
        self._warn_merged_above_unmerged(found)

    @staticmethod
    def _warn_merged_above_unmerged(found: list[tuple[str, Any]]) -> None:
        """A layer's forward applies its method to what the layers below give; once merged, its
        weight change is folded into the plain module and so also passes through every *unmerged*
        layer below it. That is exact for additive methods only: warn (HF PEFT gives the same
        numbers, silently) when a merged layer sits above one whose active adapters stay unmerged."""
        import warnings

        below = {id(layer._modules.get("base_layer")) for _, layer in found}
        for path, top in found:
            if id(top) in below:
                continue  # not the outermost layer of its chain
            chain, layer = [], top
            while hasattr(layer, "merged_adapters"):
                chain.append(layer)
                layer = layer._modules.get("base_layer")
            merged_above = None
            for layer in chain:  # outermost first
                unmerged_active = [a for a in layer._active_adapters
                                   if layer.has_adapter(a) and a not in layer.merged_adapters]
                if merged_above is not None and unmerged_active:
                    warnings.warn(
                        f"{path}: the {merged_above.peft_type} layer was merged while the {layer.peft_type} layer below "
                        f"it keeps active unmerged adapter(s) {unmerged_active}; unless both methods are additive "
                        "(LoRA without DoRA, LoHa, LoKr) the output now differs from the unmerged model (OFT, IA3 and "
                        "DoRA apply to what is below them). Merge the layers below too (merge inside out).",
                        UserWarning, stacklevel=4,
                    )
                    break
                if layer.merged_adapters:
                    merged_above = layer

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._merge_inside_out(adapter_names, safe_merge)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        self._merge_inside_out(adapter_names, safe_merge, progressbar)
        return replace_with_base(self.model, keep_trained_copies=True)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        for name in names:
            super().delete_adapter(name)
        self._drop_empty_layers()

    def _drop_empty_layers(self) -> None:
        """Take out adapter layers left with no adapter (the last adapter of their method was
        deleted, or a failed load was rolled back), innermost first, so the model is as it was
        before that method's first adapter arrived."""

        for path, layer in reversed(list(adapter_layers(self.model))):
            if not layer.adapter_names():
                layer.unmerge(fold=get_registry().merge)
                _set_module(self.model, path, layer.base_layer)


class PeftMixedModel(PeftModel):
    """HF PEFT's ``PeftMixedModel``: LoRA, LoHa, LoKr, OFT... adapters on one model, several active at
    once (``set_adapter([...])``); their outputs add up in the order the adapters were added."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        nn.Module.__init__(self)
        check_config_compatible(peft_config)
        self._attach(MixedModel(model, peft_config, adapter_name))
        self.special_peft_forward_args = {"adapter_names"}
        self._adapters_disabled = False
        cast_adapter_dtype(self.get_base_model(), adapter_name, True)
        if _gradient_checkpointing(model):
            self.prepare_model_for_gradient_checkpointing(model)
        if hasattr(getattr(model, "config", None), "pretraining_tp"):
            model.config.pretraining_tp = 1

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter of any layer method (it does not become active)."""
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"Adapter with name '{adapter_name}' already exists.")
        check_config_compatible(peft_config)
        super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage, autocast_adapter_dtype)

    def set_modules_to_save(self, peft_config: PeftConfig, adapter_name: str) -> None:
        """HF PEFT's: wrap ``peft_config.modules_to_save`` for ``adapter_name`` (adding an adapter
        already does this; kept for code that calls it)."""

        wrap_modules_to_save(self.get_base_model(), getattr(peft_config, "modules_to_save", None), adapter_name)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or several (of any methods); they are applied in the order they were
        added, whatever the order given here (as in HF PEFT)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        mismatched = set(names) - set(self.peft_config)
        if mismatched:
            raise AdapterNameError(
                f"Adapter(s) {sorted(mismatched)} not found, available adapters: {sorted(self.peft_config)}"
            )

        for _, module in walk_modules(self.get_base_model(), stop=(ModulesToSaveWrapper,)):
            if isinstance(module, ModulesToSaveWrapper) and sum(n in module.modules_to_save for n in names) > 1:
                raise ValueError(f"Only one adapter can be set at a time for {module}, got "
                                 f"{sum(n in module.modules_to_save for n in names)}")  # HF PEFT's refusal
        self.base_model.set_adapter(names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.delete_adapter(adapter_name)

    # ---- save / load (beyond HF PEFT) -----------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write every (or each selected) adapter into ``save_directory/<adapter name>/`` in HF PEFT's
        single-method format, and ``mixed_adapters.json``: the adapters in the order they were added
        (which is the stacking order), their methods and the active adapters. The whole folder is
        replaced at once; HF PEFT's own ``PeftMixedModel.save_pretrained`` raises instead."""

        if kwargs:
            raise TypeError(f"PeftMixedModel.save_pretrained got unexpected keyword argument(s) {sorted(kwargs)}")
        selected = self._adapters_to_save(selected_adapters)
        names = [n for n in self.peft_config if n in selected]  # stacking order
        if not is_main_process:
            return
        with staged_checkpoint(save_directory) as stage:
            for name in names:
                save_adapter(self, name, Path(stage) / name, safe_serialization=safe_serialization)
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": 1,
                "adapters": [
                    {"name": n, "peft_type": str(getattr(self.peft_config[n].peft_type, "value", self.peft_config[n].peft_type)),
                     "subfolder": n}
                    for n in names
                ],
                "active_adapters": [n for n in self.active_adapters if n in names],
            }
            atomic_write_text(Path(stage) / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> PeftMixedModel:
        """HF PEFT's ``PeftMixedModel.from_pretrained`` for one saved adapter (any layer method);
        for a folder written by :meth:`save_pretrained` (it holds ``mixed_adapters.json``) every
        adapter in it, in its stacking order, with the saved active adapters (``adapter_name`` and
        ``config`` do not apply then)."""
        manifest_path = Path(model_id) / MANIFEST_NAME
        if config is None and manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON
                raise CheckpointError(f"{manifest_path} is not readable JSON: {exc}") from None
            return cls._from_manifest(model, Path(model_id), manifest, is_trainable, kwargs)
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"),
                                                **{k: kwargs[k] for k in ("revision", "cache_dir", "token") if k in kwargs})
        check_config_compatible(config)
        config.inference_mode = not is_trainable
        return wrap_and_load(model, lambda: cls(model, config, adapter_name),
                             lambda peft_model: peft_model.load_adapter(model_id, adapter_name,
                                                                        is_trainable=is_trainable, **kwargs))

    @classmethod
    def _from_manifest(cls, model: nn.Module, folder: Path, manifest: dict[str, Any], is_trainable: bool,
                       kwargs: dict[str, Any]) -> PeftMixedModel:
        adapters = manifest.get("adapters") if isinstance(manifest, dict) else None
        if (not isinstance(adapters, list) or not adapters or manifest.get("format") != MANIFEST_FORMAT
                or not all(isinstance(entry, dict) for entry in adapters)):
            raise CheckpointError(f"{folder / MANIFEST_NAME} is not a peft-kernel mixed-adapter manifest (or lists no adapter)")
        entries = []
        for entry in adapters:
            name, sub = entry.get("name"), entry.get("subfolder")
            if not (isinstance(sub, str) and sub and "/" not in sub and "\\" not in sub and sub not in (".", "..")):
                raise CheckpointError(f"{folder / MANIFEST_NAME}: adapter {name!r} has no valid sub-folder ({sub!r})")
            entries.append((name, folder / sub))

        def load_the_rest(peft_model: PeftMixedModel) -> None:
            for name, sub in entries[1:]:
                peft_model.load_adapter(sub, name, is_trainable=is_trainable, **kwargs)
            peft_model.set_adapter(manifest.get("active_adapters") or [entries[0][0]], inference_mode=not is_trainable)

        first_name, first_folder = entries[0]
        return wrap_and_load(model, lambda: cls.from_pretrained(model, first_folder, first_name,
                                                                is_trainable=is_trainable, **kwargs), load_the_rest)
