"""What ``LoraModel`` (the generated tuner, ``peft_model.base_model``) adds to the core's
``AdapterModel`` (the record's ``tuner_mixin``). Imported on first use only."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch


class LoraTuner:
    """Mixed into the core's ``AdapterModel`` (which provides ``model``, ``peft_config``, ``active_adapters``)."""

    def _get_kasa_loss(self, adapter_names: Optional[Union[str, list[str]]] = None) -> torch.Tensor | float:
        """KaSA's regularisation (see :func:`peft_kernel_lora.kasa.loss`) of ``adapter_names`` (default:
        the active adapters), to add to the task loss; ``0.0`` when none of them uses KaSA (HF's name)."""
        from peft_kernel_lora.kasa import loss

        names: Any = self.active_adapters if adapter_names is None else adapter_names  # type: ignore[attr-defined]
        names = [names] if isinstance(names, str) else list(names)
        configs = self.peft_config  # type: ignore[attr-defined]
        settings = {n: getattr(configs.get(n), "kasa_config", None) for n in names}
        return loss(self.model, names, settings)  # type: ignore[attr-defined]
