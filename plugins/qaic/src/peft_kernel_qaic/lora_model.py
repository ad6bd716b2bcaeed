"""``QEffAutoLoraModelForCausalLM``: one base model, many LoRA adapters, one static graph.

Adapters are stacked into the graph (slot 0 = zeros = ``"base"``, slot ``i`` = the ``i``-th
loaded adapter); each batch row picks its slot through the ``lora_ids`` input, so a batch mixes
adapters freely. Unlike QEfficient, adapters may differ in rank (zero-padded exactly), scaling
(``lora_alpha``, ``use_rslora``, ``rank_pattern`` / ``alpha_pattern``) and target modules (any
linear of the decoder layers; a module an adapter does not target gets zeros for it).

Loading or unloading an adapter after ``export`` changes the stacked weights: the next
``export`` / ``compile`` / ONNX Runtime ``generate`` re-exports (seconds for small models; the
base model is not reloaded), and the device needs a recompile because the weights live in the
compiled binary. Use ``QEffAutoPeftModelForCausalLM`` to swap adapters with no re-export.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Sequence

from torch import nn

from peft_kernel_qaic.adapters import (
    BASE_ADAPTER,
    LoraAdapter,
    adapter_from_peft_model,
    load_lora_adapter,
    stack_adapters,
    supported_linears,
)
from peft_kernel_qaic.base import QaicCausalLMBase, as_prompt_list, load_causal_lm
from peft_kernel_qaic.errors import AdapterLoadError, AdapterMappingError, AdapterSlotError
from peft_kernel_qaic.graph import QaicCausalLM
from peft_kernel_qaic.runtime import GenerationResult


class QEffAutoLoraModelForCausalLM(QaicCausalLMBase):
    """A causal LM serving many LoRA adapters in one Cloud AI 100 graph (mixed batches by id).

    ``max_num_adapters`` fixes the number of adapter slots (besides ``"base"``); unused slots stay
    zero, and loading more adapters than that raises :class:`AdapterSlotError`. By default the
    graph has exactly as many slots as adapters are loaded at export time.

    ``continuous_batching=True`` exports a graph with a ``batch_index`` input and a KV cache of
    ``full_batch_size`` slots (given to ``export`` / ``compile`` / ``generate``): ``generate`` then
    serves any number of prompts, prefilling each into a free slot, decoding all busy slots
    together and refilling a slot as soon as its prompt finishes, every slot with its own adapter.
    """

    _kind = "lora"

    def __init__(self, model: nn.Module, max_num_adapters: int | None = None, continuous_batching: bool = False) -> None:
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            peft_model, model = model, model.get_base_model()
        else:
            peft_model = None
        super().__init__(load_causal_lm(model), continuous_batching=continuous_batching)
        if max_num_adapters is not None and (not isinstance(max_num_adapters, int) or max_num_adapters < 0):
            raise ValueError(f"max_num_adapters must be a non-negative integer, got {max_num_adapters!r}")
        self.max_num_adapters = max_num_adapters
        self.adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        if peft_model is not None:
            for name in peft_model.peft_config:
                self._add(adapter_from_peft_model(peft_model, name))

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path: Any, max_num_adapters: int | None = None,
                        continuous_batching: bool = False, **kwargs: Any):
        """A base causal LM (local folder, Hub id, or an already built transformers model)."""
        return cls(load_causal_lm(pretrained_name_or_path, **kwargs), max_num_adapters=max_num_adapters,
                   continuous_batching=continuous_batching)

    # ---- adapters -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return [BASE_ADAPTER, *self.adapters]

    @property
    def adapter_name_to_id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.adapter_names)}

    @property
    def num_slots(self) -> int:
        """Slots in the graph: ``"base"`` plus ``max_num_adapters`` (or the loaded adapters)."""
        return 1 + max(len(self.adapters), self.max_num_adapters or 0)

    def _add(self, adapter: LoraAdapter) -> int:
        name = adapter.name
        if not isinstance(name, str) or not name:
            raise AdapterLoadError(f"adapter_name must be a non-empty string, got {name!r}")
        if name == BASE_ADAPTER:
            raise AdapterLoadError(f"{BASE_ADAPTER!r} is reserved for the base model (adapter id 0); pick another name")
        if name in self.adapters:
            raise AdapterLoadError(f"an adapter named {name!r} is already loaded (unload_adapter({name!r}) first)")
        if self.max_num_adapters is not None and len(self.adapters) >= self.max_num_adapters:
            raise AdapterSlotError(
                f"cannot load adapter {name!r}: the graph has {self.max_num_adapters} adapter slot(s) "
                f"(max_num_adapters), all taken by {list(self.adapters)}; unload one or create the model with a "
                "larger max_num_adapters (which means a re-export and recompile)"
            )
        self.adapters[name] = adapter
        return self.adapter_name_to_id[name]

    def load_adapter(self, adapter_model_id: Any, adapter_name: str | None = None, **kwargs: Any) -> int:
        """Load a LoRA adapter (folder, Hub id, or a live PeftModel); returns its id (0 is ``"base"``)."""
        if isinstance(adapter_model_id, nn.Module):
            source = kwargs.pop("source_adapter_name", "default")
            adapter = adapter_from_peft_model(adapter_model_id, source, adapter_name or source)
        else:
            name = adapter_name or os.path.basename(os.path.normpath(str(adapter_model_id)))
            if name == BASE_ADAPTER or name in self.adapters:
                self._add(LoraAdapter(name=name, config=None, weights={}))  # raises the naming error
            adapter = load_lora_adapter(adapter_model_id, name, self.model, **kwargs)
        return self._add(adapter)

    def unload_adapter(self, adapter_name: str) -> bool:
        """Remove an adapter; the ids of adapters loaded after it shift down by one."""
        if adapter_name not in self.adapters:
            raise AdapterMappingError(f"no adapter named {adapter_name!r} is loaded; loaded: {list(self.adapters)}")
        del self.adapters[adapter_name]
        return True

    # ---- graph ----------------------------------------------------------------------------
    def _slots(self) -> list[LoraAdapter | None]:
        slots: list[LoraAdapter | None] = [None, *self.adapters.values()]
        return slots + [None] * (self.num_slots - len(slots))

    def _build_graph(self) -> QaicCausalLM:
        stacks = stack_adapters(self._slots(), supported_linears(self.model))
        return QaicCausalLM(self.model, lora_mode="stacked", lora_stacks=stacks, continuous_batching=self.continuous_batching)

    def _hash_parts(self):
        return [a.fingerprint() if a is not None else None for a in self._slots()], {}

    def _meta_extra(self):
        slots = self._slots()
        ranks: dict[str, int] = {}
        for a in slots:
            for m, r in (a.ranks if a is not None else {}).items():
                ranks[m] = max(ranks.get(m, 0), r)
        return {
            "adapter_slots": [BASE_ADAPTER] + [a.name if a is not None else None for a in slots[1:]],
            "lora_modules": ranks,
        }

    # ---- generate -------------------------------------------------------------------------
    def resolve_mapping(self, mapping: Sequence[str] | None, num_prompts: int) -> tuple[list[int], list[str]]:
        if mapping is None:
            return [0] * num_prompts, [BASE_ADAPTER] * num_prompts
        if isinstance(mapping, str):
            mapping = [mapping]
        mapping = list(mapping)
        if len(mapping) != num_prompts:
            raise AdapterMappingError(
                f"prompt_to_adapter_mapping has {len(mapping)} entries but there are {num_prompts} prompts; give "
                "one adapter name (or 'base') per prompt"
            )
        ids = self.adapter_name_to_id
        unknown = sorted({m for m in mapping if m not in ids}, key=str)
        if unknown:
            raise AdapterMappingError(
                f"prompt_to_adapter_mapping names unknown adapter(s) {unknown}; loaded: {self.adapter_names}"
            )
        return [ids[m] for m in mapping], mapping

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
        full_batch_size: int | None = None,
    ) -> GenerationResult:
        """Greedy generation for a mixed batch: ``prompt_to_adapter_mapping[i]`` serves ``prompts[i]``.

        With ``continuous_batching=True``, ``full_batch_size`` (at most the exported/compiled one)
        slots serve the prompts in turn; outputs are in prompt order either way.

        ``runtime="ai100"`` runs the compiled QPC on the card; ``runtime="onnxruntime"`` runs the
        same exported graph on CPU (exporting it first if needed). Returns a
        :class:`~peft_kernel_qaic.runtime.GenerationResult` (``generated_texts``, ``generated_ids``).
        """
        items = as_prompt_list(prompts, prompt_token_ids)
        adapter_ids, names = self.resolve_mapping(prompt_to_adapter_mapping, len(items))
        return self._run_generate(
            tokenizer, items if prompt_token_ids is None else None, adapter_ids, names, generation_len, runtime,
            device_id, return_logits, prompt_token_ids=prompt_token_ids, full_batch_size=full_batch_size,
        )
