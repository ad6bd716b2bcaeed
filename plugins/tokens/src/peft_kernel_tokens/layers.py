"""The trainable-token-rows layer: an ``nn.Embedding`` (or an ``nn.Linear`` output embedding) whose
rows ``token_indices`` are replaced by the adapter's ``trainable_tokens_delta`` (the rows' new
values, HF PEFT's name and on-disk key); the base weight stays frozen.

Tied input / output embeddings share one row tensor (HF PEFT's behaviour): both layers hold *the
same* parameter, trained once and saved under each layer's key. Nothing copies the weight on a
forward: the base output is computed, then the selected tokens' outputs are overwritten (a gather
for an embedding, the selected logits for an output layer). Mixed batches run each adapter's rows
on its own batch rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import AdapterLayer, BufferDict, ConfigError, Routing


def check_indices(token_indices: list[int], weight: torch.Tensor, module_name: str) -> None:
    out_of_range = [i for i in token_indices if i >= weight.shape[0]]
    if out_of_range:
        raise ConfigError(f"token_indices {out_of_range} are out of range for {module_name!r}, which has "
                          f"{weight.shape[0]} tokens")


def rows_key(module_name: str) -> str:
    """Shared-tensor key under which another method hands a module its token rows (a parameter)..."""
    return f"token_rows:{module_name}"


def indices_key(module_name: str) -> str:
    """... and the token ids of those rows (a ``LongTensor``)."""
    return f"token_indices:{module_name}"


class TrainableTokensLayer(AdapterLayer):
    """Selected rows of an embedding (or of an output embedding's weight) trained per adapter."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")
    status_type_names = {"*": "TrainableTokensLayer"}  # HF PEFT's bare class name
    status_type_prefixed = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.trainable_tokens_delta = nn.ParameterDict()
        self.trainable_tokens_original = BufferDict()  # the base rows, for unmerge (not saved, as HF)
        self.token_indices: dict[str, list[int]] = {}
        self._lookups: dict[tuple[str, torch.device], torch.Tensor] = {}

    def update_layer(self, adapter_name: str, config: Any, module_name: str = "",
                     shared: dict[str, torch.Tensor] | None = None) -> None:
        """A new adapter whose rows a method built (``rows_key`` / ``indices_key`` in ``shared``);
        methods with their own config override this and call :meth:`add_rows`."""
        if not shared or rows_key(module_name) not in shared:
            raise ConfigError(f"no token rows were given for {module_name!r} (adapter {adapter_name!r})")
        self.add_rows(adapter_name, shared[rows_key(module_name)], shared[indices_key(module_name)].tolist())

    def add_rows(self, adapter_name: str, rows: nn.Parameter, token_indices: list[int]) -> None:
        """Give ``adapter_name`` the trained ``rows`` of ``token_indices`` (``rows`` may be shared with
        tied layers). Other methods use this too (LoRA's ``trainable_token_indices``)."""
        weight = self.base_layer.weight
        self.trainable_tokens_delta[adapter_name] = rows
        self.trainable_tokens_original[adapter_name] = weight.detach()[token_indices].clone()
        self.token_indices[adapter_name] = list(token_indices)
        self._lookups = {}

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._lookups = {}

    # ---- forward ----------------------------------------------------------------------------
    def _indices(self, adapter_name: str, device: torch.device) -> torch.Tensor:
        key = (adapter_name, device)
        if key not in self._lookups:
            self._lookups[key] = torch.tensor(self.token_indices[adapter_name], device=device)
        return self._lookups[key]

    def _replace(self, x: torch.Tensor, out: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``out`` (the base's output for ``x``) with ``adapter_name``'s tokens replaced."""
        rows = self.trainable_tokens_delta[adapter_name]
        indices = self._indices(adapter_name, out.device)
        if isinstance(self.base_layer, nn.Embedding):
            position = torch.full((self.base_layer.num_embeddings,), -1, dtype=torch.long, device=out.device)
            position[indices] = torch.arange(len(indices), device=out.device)
            found = position[x]
            replaced = rows.to(out.dtype)[found.clamp(min=0)]
            scale = getattr(self.base_layer, "embed_scale", None)  # embeddings that scale their output (Gemma)
            if scale is not None:
                replaced = replaced * torch.as_tensor(scale, dtype=out.dtype, device=out.device)
            return torch.where((found >= 0).unsqueeze(-1), replaced, out)
        bias = self.base_layer.bias
        logits = F.linear(x.to(rows.dtype), rows, None if bias is None else bias[indices])
        return out.index_copy(out.dim() - 1, indices, logits.to(out.dtype))

    def adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in adapters:  # several active adapters: later ones win where their tokens overlap
            result = self._replace(x, result, name)
        return result

    def mixed_forward(self, x: torch.Tensor, routing: Routing, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each adapter's tokens on its own batch rows (one pass per adapter present, never per row)."""
        result = self.base_layer(x, *args, **kwargs)
        for name, rows in routing.groups(x.shape[0], x.device).items():
            if self.has_adapter(name):
                part = self._replace(x.index_select(0, rows), result.index_select(0, rows), name)
                result = result.index_copy(0, rows, part)
        return result

    # ---- merge: write the rows into the weight, and the originals back ----------------------
    def merge_into_base(self, adapter_name: str, safe_merge: bool = False) -> None:
        rows = self.trainable_tokens_delta[adapter_name].detach()
        if safe_merge and not torch.isfinite(rows).all():
            raise ValueError(f"NaNs detected in the trained tokens of adapter {adapter_name!r}; the embedding was "
                             "left untouched.")
        self._write(adapter_name, rows)

    def unmerge_from_base(self, adapter_name: str) -> None:
        self._write(adapter_name, self.trainable_tokens_original[adapter_name])

    def _write(self, adapter_name: str, rows: torch.Tensor) -> None:
        """Idempotent, so tied layers sharing one weight may both write."""
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.index_copy_(0, self._indices(adapter_name, weight.device), rows.to(weight.dtype))
