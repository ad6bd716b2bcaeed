"""``QEffAutoPeftModelForCausalLM``: one LoRA adapter at a time, its weights as graph inputs.

The exported graph takes, for every module the adapter targets, ``<module>.lora_A`` ``[in, r]``
and ``<module>.lora_B`` ``[r, out]`` (scaling folded into ``B``) as inputs. On the card they are
buffers set once per adapter switch; on ONNX Runtime they are fed with every call. So adapters
with the same *shape signature* (target modules and ranks; ``lora_alpha`` / rsLoRA may differ)
swap with ``set_adapter`` -- no re-export, no recompile. An adapter with another signature raises
:class:`AdapterLoadError`; serve it from its own instance (or use
``QEffAutoLoraModelForCausalLM``, which stacks adapters of any shape). ``lm_head`` and
``embed_tokens`` LoRA come as inputs like any module (the embedding's ``A`` as ``[vocab, r]``);
adapters of other additive methods are converted to LoRA on load (``convert_rank=``). DoRA and
``lora_bias`` add inputs ``<module>.lora_rescale`` (``f - 1``, ``[out]``; ``f`` is folded into ``B``)
and ``<module>.lora_bias`` (``[out]``); adapters swap when these are on the same modules too.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from peft_kernel_qaic.adapters import (
    LoraAdapter,
    adapter_from_peft_model,
    load_lora_adapter,
    module_dims,
    supported_linears,
)
from peft_kernel_qaic.conversion import ConversionReport
from peft_kernel_qaic.base import QaicCausalLMBase, as_prompt_list, load_causal_lm
from peft_kernel_qaic.errors import AdapterLoadError, AdapterMappingError
from peft_kernel_qaic.graph import QaicCausalLM
from peft_kernel_qaic.runtime import GenerationResult


def _describe(signature) -> str:
    modules = sorted({m.split(".", 3)[-1] for m, _ in signature})
    ranks = sorted({r for _, r in signature})
    return f"{len(signature)} modules ({', '.join(modules)}), ranks {ranks}"


class QEffAutoPeftModelForCausalLM(QaicCausalLMBase):
    """A causal LM with one swappable LoRA adapter (weights are graph inputs) for Cloud AI 100."""

    _kind = "peft"

    def __init__(self, model: nn.Module, base_model: nn.Module | None = None) -> None:
        if not hasattr(model, "peft_config"):
            raise TypeError(
                f"QEffAutoPeftModelForCausalLM wraps a PeftModel (HF PEFT or peft-kernel), got {type(model).__name__}; "
                "use QEffAutoPeftModelForCausalLM.from_pretrained(adapter_path, base_model=...) for a saved adapter"
            )
        super().__init__(load_causal_lm(base_model if base_model is not None else model.get_base_model()))
        self.adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.signature: tuple[tuple[str, int], ...] | None = None
        self.extras: tuple[tuple[str, tuple[str, ...]], ...] | None = None  # DoRA / lora_bias inputs per module
        self._active: str | None = None
        active = getattr(model, "active_adapter", None)
        if isinstance(active, (list, tuple)):
            active = active[0] if active else None
        for name in model.peft_config:
            self._add(adapter_from_peft_model(model, name))
        if active in self.adapters:
            self._active = active

    @classmethod
    def _from_adapter(cls, adapter: LoraAdapter, base: nn.Module) -> "QEffAutoPeftModelForCausalLM":
        self = cls.__new__(cls)
        QaicCausalLMBase.__init__(self, base)
        self.adapters = OrderedDict()
        self.signature = None
        self.extras = None
        self._active = None
        self._add(adapter)
        return self

    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        base_model: Any = None,
        **kwargs: Any,
    ) -> "QEffAutoPeftModelForCausalLM":
        """Load a saved LoRA adapter and its base model.

        The base is ``base_model`` (a transformers model, folder or Hub id) or else the adapter
        config's ``base_model_name_or_path``.
        """
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder", "convert_rank")
               if k in kwargs}
        if base_model is None:
            from peft_kernel_qaic.adapters import _check_peft_type, _read_config_dict

            data, _ = _read_config_dict(pretrained_name_or_path, hub.get("subfolder"),
                                        {k: v for k, v in hub.items() if k not in ("subfolder", "convert_rank")})
            _check_peft_type(data, repr(str(pretrained_name_or_path)))
            base_model = data.get("base_model_name_or_path")
            if not base_model:
                raise AdapterLoadError(
                    f"{pretrained_name_or_path}: adapter_config.json names no base_model_name_or_path; pass base_model="
                )
        base = load_causal_lm(base_model, **kwargs)
        adapter = load_lora_adapter(pretrained_name_or_path, adapter_name, base, **hub)
        return cls._from_adapter(adapter, base)

    # ---- adapters -------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def adapter_weights(self) -> dict[str, dict[str, np.ndarray]]:
        """Per adapter, the graph inputs it feeds (``<module>.lora_A`` / ``.lora_B``)."""
        return {name: self._weight_feeds(a) for name, a in self.adapters.items()}

    @property
    def conversion_report(self) -> dict[str, ConversionReport]:
        """Per adapter converted from another additive method: its per-layer conversion errors."""
        return {name: a.conversion for name, a in self.adapters.items() if a.conversion is not None}

    def _add(self, adapter: LoraAdapter) -> None:
        if adapter.name in self.adapters:
            raise AdapterLoadError(f"an adapter named {adapter.name!r} is already loaded")
        sig, extras = adapter.signature(), adapter.extras_signature()
        if self.signature is None:
            self.signature, self.extras = sig, extras
        elif extras != self.extras:
            raise AdapterLoadError(
                f"adapter {adapter.name!r} uses DoRA / lora_bias on other modules than the one this graph was built "
                f"for ({dict(extras) or 'none'} vs {dict(self.extras) or 'none'}): their rescale and bias are graph "
                "inputs of their own. Use a separate QEffAutoPeftModelForCausalLM, or QEffAutoLoraModelForCausalLM."
            )
        elif sig != self.signature:
            first = next(iter(self.adapters), None)
            raise AdapterLoadError(
                f"adapter {adapter.name!r} has another config than the one this graph was built for "
                f"({_describe(sig)} vs {_describe(self.signature)} of {first!r}): only adapters with the same target "
                "modules and ranks swap without re-export. Use a separate QEffAutoPeftModelForCausalLM, or "
                "QEffAutoLoraModelForCausalLM, which stacks adapters of any shape."
            )
        self.adapters[adapter.name] = adapter
        if self._active is None:
            self._active = adapter.name

    def load_adapter(self, adapter_model_id: Any, adapter_name: str | None = None, set_active: bool = False, **kwargs: Any) -> None:
        """Load another adapter with the same target modules and ranks (no re-export needed)."""
        if isinstance(adapter_model_id, nn.Module):
            source = kwargs.pop("source_adapter_name", "default")
            adapter = adapter_from_peft_model(adapter_model_id, source, adapter_name or source, kwargs.pop("convert_rank", None))
        else:
            name = adapter_name or os.path.basename(os.path.normpath(str(adapter_model_id)))
            if name in self.adapters:
                raise AdapterLoadError(f"an adapter named {name!r} is already loaded")
            adapter = load_lora_adapter(adapter_model_id, name, self.model, **kwargs)
        self._add(adapter)
        if set_active:
            self.set_adapter(adapter.name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one ``generate`` uses (swaps input weights only)."""
        if adapter_name not in self.adapters:
            raise AdapterMappingError(f"no adapter named {adapter_name!r}; loaded: {list(self.adapters)}")
        self._active = adapter_name

    def unload_adapter(self, adapter_name: str) -> bool:
        if adapter_name not in self.adapters:
            raise AdapterMappingError(f"no adapter named {adapter_name!r}; loaded: {list(self.adapters)}")
        if len(self.adapters) == 1:
            raise AdapterLoadError("cannot unload the only adapter: the graph needs one to take its shapes from")
        del self.adapters[adapter_name]
        if self._active == adapter_name:
            self._active = next(iter(self.adapters))
        return True

    # ---- graph ----------------------------------------------------------------------------
    def _modules(self) -> list[str]:
        return [m for m, _ in self.signature or ()]

    def _build_graph(self) -> QaicCausalLM:
        return QaicCausalLM(self.model, lora_mode="inputs", lora_modules=self._modules(),
                            input_extras=dict(self.extras or ()))

    def _hash_parts(self):
        return [], {"signature": [list(s) for s in self.signature or ()], "extras": [list(e) for e in self.extras or ()]}

    def _uses_lora_ids(self) -> bool:
        return False

    def _example_extra(self, graph) -> tuple[torch.Tensor, ...]:
        linears = supported_linears(self.model)
        out = []
        extras = dict(self.extras or ())
        for module, r in self.signature or ():
            dim_in, dim_out = module_dims(linears[module])
            out += [torch.zeros(dim_in, r), torch.zeros(r, dim_out), *(torch.zeros(dim_out) for _ in extras.get(module, ()))]
        return tuple(out)

    def _meta_extra(self):
        extras = dict(self.extras or ())
        inputs = []
        for m in self._modules():
            inputs += [f"{m}.lora_A", f"{m}.lora_B", *(f"{m}.lora_{k}" for k in extras.get(m, ()))]
        return {"weight_inputs": inputs, "signature": [list(s) for s in self.signature or ()]}

    @staticmethod
    def _weight_feeds(adapter: LoraAdapter) -> dict[str, np.ndarray]:
        """``<module>.lora_A`` ``[in, r]``, ``.lora_B`` ``[r, out]`` (DoRA's ``f`` folded in), and
        ``.lora_bias`` / ``.lora_rescale`` (DoRA's ``f - 1``) ``[out]`` where the adapter has them."""
        def array(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.numpy(), dtype=np.float32)

        feeds = {}
        for module, (a, b) in sorted(adapter.weights.items()):
            f = adapter.dora.get(module)
            feeds[f"{module}.lora_A"] = array(a.t())
            feeds[f"{module}.lora_B"] = array((b if f is None else b * f[:, None]).t())
            if module in adapter.biases:
                feeds[f"{module}.lora_bias"] = array(adapter.biases[module])
            if f is not None:
                feeds[f"{module}.lora_rescale"] = array(f - 1.0)
        return feeds

    def _extra_feeds(self) -> dict[str, np.ndarray]:
        return self._weight_feeds(self.adapters[self._active])

    # ---- generate -------------------------------------------------------------------------
    def generate(
        self,
        tokenizer: Any = None,
        prompts: str | Sequence[str] | None = None,
        prompt_to_adapter_mapping: Sequence[str] | None = None,
        generation_len: int | None = None,
        runtime: str = "ai100",
        device_id: Sequence[int] | None = None,
        return_logits: bool = False,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        adapter_name: str | None = None,
    ) -> GenerationResult:
        """Greedy generation with the active adapter (or ``adapter_name``) for every prompt.

        ``prompt_to_adapter_mapping`` is accepted when it names one adapter for all prompts (a
        per-row mix needs ``QEffAutoLoraModelForCausalLM``).
        """
        items = as_prompt_list(prompts, prompt_token_ids)
        if prompt_to_adapter_mapping is not None:
            mapping = [prompt_to_adapter_mapping] if isinstance(prompt_to_adapter_mapping, str) else list(prompt_to_adapter_mapping)
            if len(mapping) != len(items):
                raise AdapterMappingError(
                    f"prompt_to_adapter_mapping has {len(mapping)} entries but there are {len(items)} prompts"
                )
            if len(set(mapping)) > 1:
                raise AdapterMappingError(
                    "QEffAutoPeftModelForCausalLM serves one adapter per call; for a per-prompt mix of "
                    f"{sorted(set(mapping))} use QEffAutoLoraModelForCausalLM"
                )
            adapter_name = mapping[0] if mapping else adapter_name
        if adapter_name is not None:
            self.set_adapter(adapter_name)
        names = [self._active] * len(items)
        return self._run_generate(
            tokenizer, items if prompt_token_ids is None else None, None, names, generation_len, runtime, device_id,
            return_logits, prompt_token_ids=prompt_token_ids,
        )
