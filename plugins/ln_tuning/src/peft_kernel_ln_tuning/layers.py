"""The LN tuning layer: each adapter is a trainable copy of the wrapped module, run in its place.

Not additive: the forward swaps modules rather than adding a delta, and a merge swaps the tuned copy
in as the base layer (unmerge swaps it back, exactly). One adapter runs at a time, as in HF PEFT;
a mixed batch (``adapter_names=``) runs each adapter's copy on its own rows (HF PEFT silently
ignores ``adapter_names`` here and runs the active adapter on every row).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, Routing, UnsupportedFeatureError
from peft_kernel_ln_tuning.config import LNTuningConfig


class LNTuningLayer(AdapterLayer):
    """Any module with per-adapter tuned copies (``ln_tuning_layers``, HF PEFT's on-disk key)."""

    adapter_layer_names = ("ln_tuning_layers",)
    status_type_names = {"*": "LNTuningLayer"}  # HF PEFT's class name, whatever the wrapped module

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: LNTuningConfig, module_name: str = "") -> None:
        """The adapter starts as an exact copy of the (unmerged) base module."""
        source = self.base_layer
        if self.merged_adapters:  # the base slot holds a tuned copy; the original sits in its dict entry
            source = self.ln_tuning_layers[self.merged_adapters[-1]]
        self.ln_tuning_layers[adapter_name] = copy.deepcopy(source)

    # ---- forward ----------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(adapters) > 1:
            raise ValueError(f"Trying to run forward with {len(adapters)} active adapters, but LN tuning does not "
                             "allow inference with more than one adapter at a time")
        return self.ln_tuning_layers[adapters[0]](x, *args, **kwargs)

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each adapter's copy on its own rows (one call per adapter present, never per row)."""
        groups = {name: rows for name, rows in routing.groups(x.shape[0], x.device).items() if self.has_adapter(name)}
        if len(groups) == 1 and next(iter(groups.values())).numel() == x.shape[0]:
            return self.ln_tuning_layers[next(iter(groups))](x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name, rows in groups.items():
            tuned = self.ln_tuning_layers[name](x.index_select(0, rows), *args, **kwargs)
            result = result.index_copy(0, rows, tuned.to(result.dtype))
        return result

    # ---- merge: swap the tuned copy in, and back --------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None, fold: Any = None) -> None:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if len(names) > 1:
            raise ValueError(f"Trying to merge {len(names)} adapters, but LN tuning does not allow merging more "
                             "than one adapter at a time")
        if self.merged_adapters and names and names[0] not in self.merged_adapters:
            raise ValueError(f"LN tuning adapter {self.merged_adapters[0]!r} is merged already; unmerge it before "
                             f"merging {names[0]!r} (only one tuned copy can replace the module)")
        super().merge(safe_merge=safe_merge, adapter_names=names, fold=fold)

    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        tuned = self.ln_tuning_layers[adapter_name]
        if safe_merge and not all(torch.isfinite(p).all() for p in tuned.parameters()):
            raise ValueError(f"NaNs detected in the tuned copy of adapter {adapter_name!r}; the base layer was left "
                             "untouched.")
        self._swap(adapter_name)

    def unmerge_from_base(self, adapter_name: str) -> None:
        self._swap(adapter_name)

    def _swap(self, adapter_name: str) -> None:
        """Exchange the base module and ``adapter_name``'s copy (merging twice is the identity)."""
        self.ln_tuning_layers[adapter_name], self.base_layer = self.base_layer, self.ln_tuning_layers[adapter_name]


def make_layer(config: LNTuningConfig, adapter_name: str, base_layer: nn.Module, module_name: str) -> LNTuningLayer:
    """Any module without submodules can be tuned: norms, and also ``nn.Linear`` or an embedding
    (HF PEFT warns for those and proceeds). A block with submodules (an MLP) is refused: HF PEFT
    saves its copy's tensors under the adapter's name (``ln_tuning_layers.default.up_proj.weight``),
    so such a checkpoint loads under that name only and silently loses them under any other."""
    if next(base_layer.children(), None) is not None:
        raise UnsupportedFeatureError(
            f"LN tuning cannot target {module_name!r} ({type(base_layer).__name__}): it has submodules. Target its "
            "norm (or other leaf) layers instead; HF PEFT's checkpoints of such blocks depend on the adapter name."
        )
    layer = LNTuningLayer(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer
