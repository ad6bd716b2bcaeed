"""LoRA adapters as the Cloud AI 100 graph sees them: per-module ``A`` / scaled ``B`` matrices.

An adapter is loaded with the core's public API (``PeftModel.from_pretrained``) and read through
the core's ``LowRankLayer`` protocol (``low_rank_factors`` -> ``A`` ``[r, in]``, ``B`` ``[out, r]``,
``scale``), never by parsing a method's tensor names: a saved adapter (HF PEFT or peft-kernel) is
loaded onto a *view* of the base model -- a module tree with the base model's own leaf modules at
the same paths -- so the base model itself is never wrapped or changed; a live peft-kernel
``PeftModel`` is read directly; a live HF PEFT ``PeftModel`` is saved with its own
``save_pretrained`` to a temporary folder and loaded like a saved adapter. The config is checked
first (LoRA, no features this backend does not export), then the factors against the base model
(module names, shapes). Per targeted module the result is ``A`` (``[r, in]``) and
``B * scale`` (``[out, r]``), plus ``lora_bias`` and DoRA's per-output factor where the adapter has
them (:mod:`peft_kernel_qaic.factors`); the decoder-layer linears, ``lm_head`` and the input
embedding (``embed_tokens``) may be targeted. Adapters of other *additive* methods (LoHa, LoKr,
VeRA, ...) are loaded the same way, then converted to LoRA by truncated SVD
(:mod:`peft_kernel_qaic.conversion`, the error per layer reported). Adapters with different ranks,
scalings and target modules are then stacked into ``[num_slots, in, R]`` / ``[num_slots, R, out]``
tensors (``R`` = the largest rank for that module, zero-padded; slot 0 = all zeros = ``"base"``).
Zero padding is exact: the padded columns of ``A`` and rows of ``B`` add exact zeros.
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

from peft_kernel_qaic.conversion import (
    DEFAULT_CONVERT_RANK,
    ConversionReport,
    check_convertible,
    check_rank,
    convert_adapter,
    peft_type_name,
)
from peft_kernel_qaic.errors import AdapterLoadError
from peft_kernel_qaic.factors import ModuleDelta, read_module

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

# The causal LM's modules outside the decoder layers that LoRA may target.
HEAD = "lm_head"
EMBEDDING = "model.embed_tokens"

# LoRA config fields whose non-default values change the math in ways this backend does not export.
_UNSUPPORTED = {
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
    biases: dict[str, torch.Tensor] = attrs.field(factory=dict)
    """``lora_bias``: per module, ``scaling * lora_B.bias`` ``[out]``."""
    dora: dict[str, torch.Tensor] = attrs.field(factory=dict)
    """DoRA: per module, ``f = m / ‖W + s·BA‖`` ``[out]`` (the output is ``f·(W x + s·BA x) + b``)."""
    conversion: ConversionReport | None = None
    """For an adapter of another additive method: how it was converted to LoRA."""

    @property
    def ranks(self) -> dict[str, int]:
        return {m: a.shape[0] for m, (a, _) in self.weights.items()}

    def signature(self) -> tuple[tuple[str, int], ...]:
        """Target modules and ranks: what a swap-class export is specialised to."""
        return tuple(sorted(self.ranks.items()))

    def extras_signature(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Per module with ``lora_bias`` and/or DoRA: ``("bias", "rescale")`` or one of them."""
        kinds: dict[str, list[str]] = {}
        for kind, tensors in (("bias", self.biases), ("rescale", self.dora)):
            for module in tensors:
                kinds.setdefault(module, []).append(kind)
        return tuple(sorted((m, tuple(k)) for m, k in kinds.items()))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(_jsonable(self.config), sort_keys=True, default=str).encode())
        for kind, tensors in (("lora", self.weights), ("bias", self.biases), ("dora", self.dora)):
            for module in sorted(tensors):
                value = tensors[module]
                h.update(f"{kind}:{module}".encode())
                for t in value if isinstance(value, tuple) else (value,):
                    h.update(str(tuple(t.shape)).encode())
                    h.update(t.detach().contiguous().float().numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def from_deltas(cls, name: str, config: Any, deltas: Mapping[str, ModuleDelta], source: str = "",
                    conversion: ConversionReport | None = None) -> "LoraAdapter":
        return cls(
            name=name, config=config, source=source, conversion=conversion,
            weights={m: (d.a, d.b) for m, d in deltas.items()},
            biases={m: d.bias for m, d in deltas.items() if d.bias is not None},
            dora={m: d.dora for m, d in deltas.items() if d.dora is not None},
        )


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


def supported_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every module the graph can put LoRA on, by its name in the causal LM: the decoder-layer
    linears, ``lm_head`` and the input embedding (an ``nn.Embedding``)."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for suffix in LAYER_LINEARS:
            module = layer.get_submodule(suffix)
            out[f"model.layers.{i}.{suffix}"] = getattr(module, "base_layer", module)
    for name in (HEAD, EMBEDDING):
        module = model.get_submodule(name)
        out[name] = getattr(module, "base_layer", module)
    return out


def module_dims(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a supported module: a linear's features, an embedding's (vocab, dim)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


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
                f"adapter {where} sets {field}={value!r}, which the qaic backend does not export (it serves LoRA "
                f"-- with DoRA, lora_bias, lm_head / embedding targets -- and converted additive adapters). Merge or "
                "drop that feature first."
            )


def _check_peft_type(data: Mapping[str, Any], where: str) -> str:
    """The adapter's method name; :class:`AdapterLoadError` unless it is LoRA or another additive
    method (converted to LoRA on load)."""
    peft_type = peft_type_name(data.get("peft_type", ""))
    if peft_type != "LORA":
        check_convertible(peft_type, where)
    return peft_type


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


class _ModelView(nn.Module):
    """The root of a view: answers ``get_input_embeddings`` / ``get_output_embeddings`` with the
    view's modules at the base model's paths, so loading sees tied embeddings
    (``ensure_weight_tying``) as on the model itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        paths = {id(m): p for p, m in _leaf_modules(model)}
        ends = (getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None))
        self._embedding_paths = [paths.get(id(_innermost(end()))) if end is not None else None for end in ends]

    def _embedding(self, i: int) -> nn.Module | None:
        path = self._embedding_paths[i]
        return None if path is None else self.get_submodule(path)

    def get_input_embeddings(self) -> nn.Module | None:
        return self._embedding(0)

    def get_output_embeddings(self) -> nn.Module | None:
        return self._embedding(1)


def _innermost(module: nn.Module | None) -> nn.Module | None:
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _view(model: nn.Module) -> nn.Module:
    """A module tree with ``model``'s leaf modules (shared, not copied) at their paths: adapters
    loaded onto it wrap the view's entries and leave ``model`` as it is."""
    root = _ModelView(model)
    for path, leaf in _leaf_modules(model):
        node = root
        *parents, last = path.split(".")
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(last, leaf)
    return root


def _read_factors(model: nn.Module, adapter_name: str, base: nn.Module, where: str) -> dict[str, ModuleDelta]:
    """``{module: ModuleDelta}`` of ``adapter_name`` from the LoRA layers in ``model`` (module
    paths as in the causal LM), checked against ``base``'s supported modules."""
    supported = supported_linears(base)
    deltas: dict[str, ModuleDelta] = {}
    for module, layer in model.named_modules():
        if not hasattr(layer, "low_rank_factors") or not layer.has_adapter(adapter_name):
            continue
        inner = layer.base_layer
        if module not in supported:
            raise AdapterLoadError(
                f"adapter {where} targets {module} ({type(inner).__name__}); the qaic backend puts LoRA on the "
                f"linears of the decoder layers ({', '.join(LAYER_LINEARS)}), {HEAD} and {EMBEDDING} only"
            )
        training = layer.training
        layer.train(False)  # the factors of the adapter as exported: no live dropout
        try:
            deltas[module] = read_module(layer, adapter_name, where, module)
        finally:
            layer.train(training)
    if not deltas:
        raise AdapterLoadError(f"adapter {where} holds no LoRA weights")
    return deltas


def _converted_factors(peft_model: nn.Module, adapter_name: str, name: str, method: str, rank: int | float,
                       base: nn.Module, where: str) -> tuple[dict[str, ModuleDelta], ConversionReport]:
    """Convert ``adapter_name`` of ``peft_model`` (another additive method) to LoRA, load that LoRA
    onto a fresh view of ``base`` and read its factors."""
    from peft_kernel import PeftKernelError, get_peft_model, set_peft_model_state_dict

    config, state_dict, report = convert_adapter(peft_model, adapter_name, name, method, rank, where)
    try:
        lora = get_peft_model(_view(base), config, adapter_name="qaic")
        set_peft_model_state_dict(lora, state_dict, adapter_name="qaic")
    except (PeftKernelError, ValueError) as exc:
        raise AdapterLoadError(f"cannot serve adapter {where} after its conversion to LoRA: {exc}") from None
    return _read_factors(lora.get_base_model(), "qaic", base, where), report


def _load_onto_view(path_or_id: str | os.PathLike, config: Any, base: nn.Module, where: str,
                    subfolder: str | None, hub_kwargs: Mapping[str, Any], name: str = "",
                    convert_rank: int | float | None = None) -> tuple[dict[str, ModuleDelta], ConversionReport | None]:
    """Load a saved adapter with ``PeftModel.from_pretrained`` onto a view of ``base`` and read its
    factors (converting a non-LoRA adapter to LoRA at ``convert_rank``); ``base``'s parameters keep
    their ``requires_grad``."""
    from peft_kernel import PeftKernelError, PeftModel

    flags = [(p, p.requires_grad) for p in base.parameters()]
    try:
        view = _view(base)
        try:
            peft_model = PeftModel.from_pretrained(view, path_or_id, adapter_name="qaic", config=config,
                                                   subfolder=subfolder, **hub_kwargs)
        except (PeftKernelError, ValueError) as exc:
            raise AdapterLoadError(f"cannot load adapter {where}: {exc}") from None
        method = peft_type_name(config.peft_type)
        if method != "LORA":
            return _converted_factors(peft_model, "qaic", name, method, convert_rank, base, where)
        return _read_factors(peft_model.get_base_model(), "qaic", base, where), None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def load_lora_adapter(
    path_or_id: str | os.PathLike,
    name: str,
    model: nn.Module,
    subfolder: str | None = None,
    convert_rank: int | float | None = None,
    **hub_kwargs: Any,
) -> LoraAdapter:
    """Load an adapter saved by HF PEFT / peft-kernel and check it fits ``model``.

    LoRA loads as it is; an adapter of another additive method is converted to LoRA at
    ``convert_rank`` (default :data:`~peft_kernel_qaic.conversion.DEFAULT_CONVERT_RANK`), its
    :class:`~peft_kernel_qaic.conversion.ConversionReport` in ``.conversion``."""
    from peft_kernel.plugin_api import PeftConfig, PeftKernelError

    rank = check_rank(DEFAULT_CONVERT_RANK if convert_rank is None else convert_rank)
    data, where = _read_config_dict(path_or_id, subfolder, hub_kwargs)
    _check_peft_type(data, f"{name!r} ({path_or_id})")
    try:
        config = PeftConfig.from_dict(data, source=where)
    except PeftKernelError as exc:
        raise AdapterLoadError(f"cannot load adapter {str(path_or_id)!r}: {exc}") from None
    label = f"{name!r} ({path_or_id})"
    _check_config(config, label)
    deltas, report = _load_onto_view(path_or_id, config, model, label, subfolder, hub_kwargs, name, rank)
    return LoraAdapter.from_deltas(name, config, deltas, source=str(path_or_id), conversion=report)


def adapter_from_peft_model(peft_model: nn.Module, adapter_name: str, name: str | None = None,
                            convert_rank: int | float | None = None) -> LoraAdapter:
    """A :class:`LoraAdapter` from a live HF PEFT / peft-kernel ``PeftModel`` (an adapter of
    another additive method is converted to LoRA at ``convert_rank``)."""
    rank = check_rank(DEFAULT_CONVERT_RANK if convert_rank is None else convert_rank)
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, Mapping) or adapter_name not in configs:
        raise AdapterLoadError(f"{type(peft_model).__name__} has no adapter {adapter_name!r}")
    config = configs[adapter_name]
    name = name or adapter_name
    source = f"in-memory {type(peft_model).__name__}"
    where = f"{name!r} ({source})"
    method = _check_peft_type({"peft_type": getattr(config, "peft_type", "")}, where)
    _check_config(config, where)
    base = base_causal_lm(peft_model)
    if any(hasattr(m, "low_rank_factors") for m in base.modules()):  # a peft-kernel PeftModel
        report = None
        if method != "LORA":
            deltas, report = _converted_factors(peft_model, adapter_name, name, method, rank, base, where)
        else:
            deltas = _read_factors(base, adapter_name, base, where)
        return LoraAdapter.from_deltas(name, config, deltas, source=source, conversion=report)
    # another library's PeftModel (HF PEFT): its own save_pretrained, then loaded as a saved adapter
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, selected_adapters=[adapter_name])
        saved = next(Path(folder).rglob("adapter_config.json")).parent
        adapter = load_lora_adapter(saved, name, base, convert_rank=rank)
    return attrs.evolve(adapter, source=source)


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
        dim_in, dim_out = module_dims(linears[module])
        a_stack = torch.zeros(len(slots), dim_in, rank)
        b_stack = torch.zeros(len(slots), rank, dim_out)
        for i, adapter in enumerate(slots):
            if adapter is None or module not in adapter.weights:
                continue
            a, b = adapter.weights[module]
            f = adapter.dora.get(module)
            a_stack[i, :, : a.shape[0]] = a.t()
            b_stack[i, : b.shape[1], :] = (b if f is None else b * f[:, None]).t()
        out[module] = (a_stack, b_stack)
    return out


def stack_extras(
    adapters: Iterable[LoraAdapter | None],
    linears: Mapping[str, nn.Module],
) -> dict[str, dict[str, torch.Tensor]]:
    """Per module some adapter puts ``lora_bias`` or DoRA on: ``{"bias": [S, out]}`` (each slot's
    scaled bias) and/or ``{"rescale": [S, out]}`` (DoRA's ``f - 1``: the base output without its
    bias is rescaled by it; ``B`` already carries ``f``, see :func:`stack_adapters`). Slots
    without the feature hold zeros, which add / rescale nothing."""
    slots = list(adapters)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for kind, attr in (("bias", "biases"), ("rescale", "dora")):
        for i, adapter in enumerate(slots):
            for module, value in (getattr(adapter, attr) if adapter is not None else {}).items():
                _, dim_out = module_dims(linears[module])
                stack = out.setdefault(module, {}).setdefault(kind, torch.zeros(len(slots), dim_out))
                stack[i] = value - 1.0 if kind == "rescale" else value
    return out
