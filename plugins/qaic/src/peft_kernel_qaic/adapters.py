"""LoRA adapters as the Cloud AI 100 graph sees them: per-module ``A`` / scaled ``B`` matrices.

An adapter is loaded with the core's public API (``PeftModel.from_pretrained``) and read through
the core's ``LowRankLayer`` protocol (``low_rank_factors`` -> ``A`` ``[r, in]``, ``B`` ``[out, r]``,
``scale``), never by parsing a method's tensor names: a saved adapter (HF PEFT or peft-kernel) is
loaded onto a *view* of the base model -- a module tree with the base model's own leaf modules at
the same paths -- so the base model itself is never wrapped or changed; a live peft-kernel
``PeftModel`` is read directly; a live HF PEFT ``PeftModel`` is saved with its own
``save_pretrained`` to a temporary folder and loaded like a saved adapter. The config is checked
first (LoRA, no features this backend does not export), then the factors against the base model
(module names, shapes). Per targeted linear the result is ``A`` (``[r, in]``) and
``B * scale`` (``[out, r]``). Adapters with different ranks, scalings and target modules are then
stacked into ``[num_slots, in, R]`` / ``[num_slots, R, out]`` tensors (``R`` = the largest rank for
that module, zero-padded; slot 0 = all zeros = ``"base"``). Zero padding is exact: the padded
columns of ``A`` and rows of ``B`` add exact zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import attrs
import torch
from torch import nn

from peft_kernel_qaic.errors import AdapterLoadError

BASE_ADAPTER = "base"

# The decoder-layer linears the export graph can put LoRA on (every nn.Linear of a Llama-family
# decoder layer).
LAYER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# LoRA config fields whose non-default values change the math in ways this backend does not export.
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "modules_to_save": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "target_parameters": None,
    "use_bdlora": None,
    "kasa_config": None,  # KaSA truncates the base weights and puts lora_diag between A and B
}


@attrs.define
class LoraAdapter:
    """One LoRA adapter reduced to per-module ``(A [r, in], B*scaling [out, r])`` pairs."""

    name: str
    config: Any
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    source: str = ""

    @property
    def ranks(self) -> dict[str, int]:
        return {m: a.shape[0] for m, (a, _) in self.weights.items()}

    def signature(self) -> tuple[tuple[str, int], ...]:
        """Target modules and ranks: what a swap-class export is specialised to."""
        return tuple(sorted(self.ranks.items()))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(_jsonable(self.config), sort_keys=True, default=str).encode())
        for module in sorted(self.weights):
            a, b = self.weights[module]
            h.update(module.encode())
            for t in (a, b):
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().contiguous().float().numpy().tobytes())
        return h.hexdigest()


def _jsonable(config: Any) -> Any:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a Llama-family causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise AdapterLoadError(
            f"{type(model).__name__} has no `model.layers`: the qaic backend exports Llama-family decoder "
            "models (Llama, Mistral, Qwen2, Qwen3)"
        )
    return layers


def supported_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear the graph can put LoRA on, by its module name in the causal LM."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for suffix in LAYER_LINEARS:
            module = layer.get_submodule(suffix)
            out[f"model.layers.{i}.{suffix}"] = getattr(module, "base_layer", module)
    return out


def _read_config_dict(path_or_id: str | os.PathLike, subfolder: str | None, hub_kwargs: Mapping[str, Any]) -> tuple[dict, str]:
    from peft_kernel.plugin_api import CheckpointError, resolve_file

    try:
        path = resolve_file(path_or_id, "adapter_config.json", subfolder=subfolder, **hub_kwargs)
    except CheckpointError as exc:
        raise AdapterLoadError(f"cannot load adapter {str(path_or_id)!r}: {exc}") from None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")), str(path)
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{path} is not valid JSON: {exc}") from None


def _check_config(config: Any, where: str) -> None:
    for field, default in _UNSUPPORTED.items():
        value = getattr(config, field, default)
        if value not in (default, None, False, [], {}):
            raise AdapterLoadError(
                f"adapter {where} sets {field}={value!r}; the qaic backend exports plain LoRA only "
                f"(no {field}). Merge or drop that feature first."
            )


def _check_peft_type(data: Mapping[str, Any], where: str) -> None:
    peft_type = str(data.get("peft_type", "")).upper().split(".")[-1]
    if peft_type != "LORA":
        raise AdapterLoadError(
            f"adapter {where} is a {data.get('peft_type')!r} adapter, not LoRA: the qaic backend stacks "
            "LoRA adapters only"
        )


def _leaf_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The base model's leaf modules by path; an adapter wrapper (a module with a ``base_layer``,
    as HF PEFT's and peft-kernel's layers have) counts as its innermost base layer."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        while isinstance(getattr(child, "base_layer", None), nn.Module):
            child = child.base_layer
        if next(child.children(), None) is None:
            yield path, child
        else:
            yield from _leaf_modules(child, path)


def _view(model: nn.Module) -> nn.Module:
    """A module tree with ``model``'s leaf modules (shared, not copied) at their paths: adapters
    loaded onto it wrap the view's entries and leave ``model`` as it is."""
    root = nn.Module()
    for path, leaf in _leaf_modules(model):
        node = root
        *parents, last = path.split(".")
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(last, leaf)
    return root


def _read_factors(model: nn.Module, adapter_name: str, base: nn.Module, where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A [r, in], B * scale [out, r])}`` of ``adapter_name`` from the adapter layers in
    ``model`` (module paths as in the causal LM), checked against ``base``'s supported linears."""
    linears = supported_linears(base)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, layer in model.named_modules():
        if not hasattr(layer, "low_rank_factors") or not layer.has_adapter(adapter_name):
            continue
        inner = layer.base_layer
        if module not in linears:
            raise AdapterLoadError(
                f"adapter {where} targets {module} ({type(inner).__name__}); the qaic backend "
                f"puts LoRA on the linears of the decoder layers only ({', '.join(LAYER_LINEARS)})"
            )
        training = layer.training
        layer.train(False)  # the factors of the adapter as exported: no live dropout
        try:
            factors = layer.low_rank_factors(adapter_name)
        finally:
            layer.train(training)
        if factors is None:
            raise AdapterLoadError(f"adapter {where}: {module} is not a plain low-rank adapter, which the qaic backend "
                                   "does not export")
        a, b, scale = factors
        weights[module] = (a.detach().float().contiguous(), (b.detach().float() * scale).contiguous())
    if not weights:
        raise AdapterLoadError(f"adapter {where} holds no LoRA weights")
    return weights


def _load_onto_view(path_or_id: str | os.PathLike, config: Any, base: nn.Module, where: str,
                    subfolder: str | None, hub_kwargs: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load a saved adapter with ``PeftModel.from_pretrained`` onto a view of ``base`` and read its
    factors; ``base``'s parameters keep their ``requires_grad``."""
    from peft_kernel import PeftKernelError, PeftModel

    flags = [(p, p.requires_grad) for p in base.parameters()]
    try:
        view = _view(base)
        try:
            peft_model = PeftModel.from_pretrained(view, path_or_id, adapter_name="qaic", config=config,
                                                   subfolder=subfolder, **hub_kwargs)
        except (PeftKernelError, ValueError) as exc:
            raise AdapterLoadError(f"cannot load adapter {where}: {exc}") from None
        return _read_factors(peft_model.get_base_model(), "qaic", base, where)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def load_lora_adapter(
    path_or_id: str | os.PathLike,
    name: str,
    model: nn.Module,
    subfolder: str | None = None,
    **hub_kwargs: Any,
) -> LoraAdapter:
    """Load a LoRA adapter saved by HF PEFT / peft-kernel and check it fits ``model``."""
    from peft_kernel.plugin_api import PeftConfig, PeftKernelError

    data, where = _read_config_dict(path_or_id, subfolder, hub_kwargs)
    _check_peft_type(data, repr(str(path_or_id)))
    try:
        config = PeftConfig.from_dict(data, source=where)
    except PeftKernelError as exc:
        raise AdapterLoadError(f"cannot load adapter {str(path_or_id)!r}: {exc}") from None
    label = f"{name!r} ({path_or_id})"
    _check_config(config, label)
    weights = _load_onto_view(path_or_id, config, model, label, subfolder, hub_kwargs)
    return LoraAdapter(name=name, config=config, weights=weights, source=str(path_or_id))


def adapter_from_peft_model(peft_model: nn.Module, adapter_name: str, name: str | None = None) -> LoraAdapter:
    """A :class:`LoraAdapter` from a live HF PEFT / peft-kernel ``PeftModel``."""
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, Mapping) or adapter_name not in configs:
        raise AdapterLoadError(f"{type(peft_model).__name__} has no adapter {adapter_name!r}")
    config = configs[adapter_name]
    _check_peft_type({"peft_type": getattr(getattr(config, "peft_type", ""), "value", getattr(config, "peft_type", ""))}, repr(adapter_name))
    name = name or adapter_name
    source = f"in-memory {type(peft_model).__name__}"
    where = f"{name!r} ({source})"
    _check_config(config, where)
    base = base_causal_lm(peft_model)
    if any(hasattr(m, "low_rank_factors") for m in base.modules()):
        weights = _read_factors(base, adapter_name, base, where)
        return LoraAdapter(name=name, config=config, weights=weights, source=source)
    # another library's PeftModel (HF PEFT): its own save_pretrained, then loaded as a saved adapter
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, selected_adapters=[adapter_name])
        saved = next(Path(folder).rglob("adapter_config.json")).parent
        adapter = load_lora_adapter(saved, name, base)
    return LoraAdapter(name=name, config=adapter.config, weights=adapter.weights, source=source)


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM under a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def stack_adapters(
    adapters: Iterable[LoraAdapter | None],
    linears: Mapping[str, nn.Linear],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Slot-stacked ``A`` ``[S, in, R]`` and ``B`` ``[S, R, out]`` per targeted module.

    ``adapters[i]`` fills slot ``i``; ``None`` (slot 0 = base, or a spare slot) stays zero. Only
    modules some adapter targets appear; ``R`` is the largest rank any adapter uses there.
    """
    slots = list(adapters)
    ranks: dict[str, int] = {}
    for adapter in slots:
        if adapter is None:
            continue
        for module, r in adapter.ranks.items():
            ranks[module] = max(ranks.get(module, 0), r)
    out = {}
    for module, rank in sorted(ranks.items()):
        base = linears[module]
        a_stack = torch.zeros(len(slots), base.in_features, rank)
        b_stack = torch.zeros(len(slots), rank, base.out_features)
        for i, adapter in enumerate(slots):
            if adapter is None or module not in adapter.weights:
                continue
            a, b = adapter.weights[module]
            a_stack[i, :, : a.shape[0]] = a.t()
            b_stack[i, : b.shape[1], :] = b.t()
        out[module] = (a_stack, b_stack)
    return out
