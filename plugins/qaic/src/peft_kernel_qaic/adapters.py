"""LoRA adapters as the Cloud AI 100 graph sees them: per-module ``A`` / scaled ``B`` matrices.

An adapter saved by HF PEFT (or peft-kernel) is read with the core's loader, checked against the
base model (module names, shapes, supported LoRA features) and reduced to, per targeted linear,
``A`` (``[r, in]``) and ``B * scaling`` (``[out, r]``). Adapters with different ranks, scalings
and target modules are then stacked into ``[num_slots, in, R]`` / ``[num_slots, R, out]`` tensors
(``R`` = the largest rank for that module, zero-padded; slot 0 = all zeros = ``"base"``). Zero
padding is exact: the padded columns of ``A`` and rows of ``B`` add exact zeros.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

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
    from peft_kernel.checkpoint import resolve_file
    from peft_kernel.errors import CheckpointError

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


def load_lora_adapter(
    path_or_id: str | os.PathLike,
    name: str,
    model: nn.Module,
    subfolder: str | None = None,
    **hub_kwargs: Any,
) -> LoraAdapter:
    """Read a LoRA adapter saved by HF PEFT / peft-kernel and check it fits ``model``."""
    from peft_kernel.checkpoint import load_adapter_weights
    from peft_kernel.config import PeftConfig
    from peft_kernel.errors import PeftKernelError

    data, where = _read_config_dict(path_or_id, subfolder, hub_kwargs)
    _check_peft_type(data, repr(str(path_or_id)))
    try:
        config = PeftConfig.from_dict(data, source=where)
        tensors = load_adapter_weights(path_or_id, subfolder=subfolder, **hub_kwargs)
    except PeftKernelError as exc:
        raise AdapterLoadError(f"cannot load adapter {str(path_or_id)!r}: {exc}") from None
    return build_adapter(name, config, tensors, model, source=str(path_or_id))


def build_adapter(
    name: str,
    config: Any,
    tensors: Mapping[str, torch.Tensor],
    model: nn.Module,
    source: str = "",
) -> LoraAdapter:
    """Turn on-disk-keyed LoRA tensors (``...q_proj.lora_A.weight``) into a checked :class:`LoraAdapter`.

    Keys may carry HF PEFT's ``base_model.model.`` prefix or not, and in-memory keys with the
    adapter name (``lora_A.<name>.weight``) are accepted too.
    """
    where = f"{name!r}" + (f" ({source})" if source else "")
    _check_config(config, where)
    linears = supported_linears(model)
    all_modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        k = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in k:
                module = k.split(marker)[0]
                pairs.setdefault(module, {})[part] = value
                break
        else:
            if "lora_embedding" in k or "lora_magnitude" in k:
                raise AdapterLoadError(f"adapter {where} holds {key!r}, which the qaic backend does not export")
            raise AdapterLoadError(f"adapter {where} holds {key!r}, which is not a LoRA A/B weight")
    if not pairs:
        raise AdapterLoadError(f"adapter {where} holds no LoRA weights")
    use_rslora = bool(getattr(config, "use_rslora", False))
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    from peft_kernel.targeting import pattern_value

    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterLoadError(f"adapter {where}: {module} has {sorted(pair)} but needs lora_A and lora_B")
        if module not in linears:
            if module in all_modules:
                raise AdapterLoadError(
                    f"adapter {where} targets {module} ({type(all_modules[module]).__name__}); the qaic backend "
                    f"puts LoRA on the linears of the decoder layers only ({', '.join(LAYER_LINEARS)})"
                )
            raise AdapterLoadError(
                f"adapter {where} targets {module}, which this base model does not have: is the adapter for "
                "another base model?"
            )
        base = linears[module]
        a, b = pair["lora_A"].detach().float(), pair["lora_B"].detach().float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != base.in_features or b.shape[0] != base.out_features or a.shape[0] != b.shape[1]:
            raise AdapterLoadError(
                f"adapter {where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the base "
                f"layer is Linear({base.in_features} -> {base.out_features}) (expected lora_A [r, "
                f"{base.in_features}] and lora_B [{base.out_features}, r]): the adapter was trained for another "
                "base model"
            )
        r_disk = a.shape[0]
        r = pattern_value(getattr(config, "rank_pattern", None), module, getattr(config, "r", r_disk))
        alpha = pattern_value(getattr(config, "alpha_pattern", None), module, getattr(config, "lora_alpha", r))
        if r != r_disk:
            raise AdapterLoadError(
                f"adapter {where}: {module} has rank {r_disk} on disk but its config says r={r} "
                "(check r / rank_pattern)"
            )
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        weights[module] = (a.contiguous(), (b * scaling).contiguous())
    return LoraAdapter(name=name, config=config, weights=weights, source=source)


def adapter_from_peft_model(peft_model: nn.Module, adapter_name: str, name: str | None = None) -> LoraAdapter:
    """A :class:`LoraAdapter` from a live HF PEFT / peft-kernel ``PeftModel`` (in-memory keys)."""
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, Mapping) or adapter_name not in configs:
        raise AdapterLoadError(f"{type(peft_model).__name__} has no adapter {adapter_name!r}")
    config = configs[adapter_name]
    _check_peft_type({"peft_type": getattr(getattr(config, "peft_type", ""), "value", getattr(config, "peft_type", ""))}, repr(adapter_name))
    tensors = {}
    for key, value in peft_model.state_dict().items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.{adapter_name}."
            if marker in key:
                tensors[key.replace(marker, f".{part}.")] = value
    base = base_causal_lm(peft_model)
    return build_adapter(name or adapter_name, config, tensors, base, source=f"in-memory {type(peft_model).__name__}")


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
