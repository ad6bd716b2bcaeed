"""Arrow routing inside a LoRA ``Linear`` layer (the router adapter of ``LoraConfig.arrow_config``).

A router adapter keeps LoRA factors of its own (saved as HF PEFT saves them) but its output is
the per-token mixture of its *experts*, the layer's task adapters: each token's scores are
``|x @ prototypes.T|``, the ``top_k`` best get ``softmax(score / router_temperature)`` and the
others nothing, and each expert adds ``weight * scaling * B(A(x))``. A prototype is the top right
singular vector of the expert's ``B @ A``, found by power iteration from a random start (seeded
by ``rng_seed`` per expert, else drawn from the global RNG) the first time the router runs, and
found again after an adapter is added to or deleted from the layer. As in HF PEFT, an adapter
added to a layer that holds a router becomes one more expert, and with GenKnowSub (``use_gks``)
every expert has the mean of the general adapters' ``A`` and ``B`` subtracted from its own,
in place and once, before its prototype is taken.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.plugin_api import ConfigError, UnsupportedFeatureError
from peft_kernel_lora.arrow_config import ArrowConfig, arrow_settings

POWER_ITERATIONS = 15
"""Power-iteration steps per prototype (HF PEFT's prototypes agree to float rounding)."""


class ArrowMergeError(UnsupportedFeatureError, RuntimeError):
    """An Arrow router routes per token: it has no weight to merge."""


class ArrowLoraLinearLayer(nn.Module):
    """One router's state in one layer (HF PEFT's name): its experts, the general adapters, the
    experts GenKnowSub has already been applied to, and the prototypes (a non-persistent buffer,
    ``None`` until the router first runs)."""

    prototypes: torch.Tensor | None

    def __init__(self, in_features: int, config: ArrowConfig) -> None:
        super().__init__()
        self.in_features = in_features
        self.top_k = config.top_k
        self.temperature = float(config.router_temperature)
        self.rng_seed = config.rng_seed
        self.use_gks = config.use_gks
        self.task_adapter_names = list(config.task_adapter_names or [])
        self.gks_adapter_names = list(config.gks_adapter_names or [])
        self.gks_subtracted: set[str] = set()
        self.register_buffer("prototypes", None, persistent=False)


def update(layer: Any, adapter_name: str, config: Any, routes: bool) -> None:
    """Called when ``adapter_name`` is added to ``layer``: it joins the experts of the routers the
    layer holds already, and becomes a router itself if its config has an ``arrow_config`` and
    ``routes`` (the layer is a ``Linear``; elsewhere a router is a plain LoRA adapter)."""
    for name, router in layer.lora_arrow.items():
        if name != adapter_name and adapter_name not in (*router.task_adapter_names, *router.gks_adapter_names):
            router.task_adapter_names.append(adapter_name)
            router.prototypes = None
    arrow = arrow_settings(config.arrow_config)
    if arrow is None or not routes:
        return
    if not arrow.task_adapter_names:
        raise ConfigError("LoraConfig.arrow_config.task_adapter_names is empty: an Arrow router needs task adapters "
                          "to route between; build Arrow models with create_arrow_model, or name the adapters")
    layer.lora_arrow[adapter_name] = ArrowLoraLinearLayer(layer.in_features, arrow)


def forget(layer: Any, adapter_name: str) -> None:
    """``adapter_name`` is being deleted from ``layer``: it stops being an expert (or general
    adapter) of the layer's other routers."""
    for name, router in layer.lora_arrow.items():
        if name == adapter_name:
            continue
        if adapter_name in router.task_adapter_names:
            router.task_adapter_names.remove(adapter_name)
            router.prototypes = None
        if adapter_name in router.gks_adapter_names:
            router.gks_adapter_names.remove(adapter_name)


def refuse_merge(adapter_name: str) -> None:
    raise ArrowMergeError(f"Cannot merge the Arrow router adapter {adapter_name!r}: it routes each token to "
                          "different experts, so it has no single weight to merge. Merge task adapters instead.")


def delta(layer: Any, x: torch.Tensor, router_name: str) -> torch.Tensor:
    """The router's output for ``x`` (already dropped out, in the adapter dtype): every token's
    top-k experts mixed by the softmax of their scores. All experts run as one pair of matmuls
    over their concatenated factors, the routing weights scaling each expert's rank block."""
    router = layer.lora_arrow[router_name]
    if router.prototypes is None:
        _prepare(layer, router_name, router)
    experts = router.task_adapter_names
    scores = (x @ router.prototypes.to(x.dtype).T).abs()
    top = scores.topk(router.top_k, dim=-1)
    weights = torch.zeros_like(scores).scatter(-1, top.indices, torch.softmax(top.values / router.temperature, dim=-1))
    a = torch.cat([layer.lora_A[n].weight for n in experts])
    b = torch.cat([layer.lora_B[n].weight for n in experts], dim=1)
    scaling = torch.tensor([layer.scaling[n] for n in experts], dtype=x.dtype, device=x.device)
    ranks = torch.tensor([layer.r[n] for n in experts], device=x.device)
    weights = weights * scaling
    out = F.linear(F.linear(x, a) * weights.repeat_interleave(ranks, dim=-1), b)
    biases = [layer.lora_B[n].bias for n in experts]
    if any(bias is not None for bias in biases):
        stacked = torch.stack([torch.zeros_like(b[:, 0]) if bias is None else bias for bias in biases])
        out = out + weights @ stacked
    return out


def _prepare(layer: Any, router_name: str, router: ArrowLoraLinearLayer) -> None:
    """Check the router's adapters, apply GenKnowSub to the experts not yet purified, and build the prototypes."""
    experts = router.task_adapter_names
    missing = [n for n in (*experts, *router.gks_adapter_names) if n not in layer.lora_A]
    if missing:
        raise ConfigError(f"Arrow router {router_name!r}: adapters {missing} named in its ArrowConfig are not "
                          f"loaded in this layer (it holds {sorted(layer.r)})")
    if router.top_k > len(experts):
        raise ConfigError(f"ArrowConfig.top_k={router.top_k} of router {router_name!r} is larger than its number "
                          f"of task adapters ({len(experts)}: {experts})")
    for name in experts:
        if layer.use_dora[name] or name in layer.alora_invocation_tokens:
            raise UnsupportedFeatureError(f"Arrow router {router_name!r}: expert {name!r} is a DoRA or aLoRA "
                                          "adapter; Arrow routes between plain LoRA adapters only")
    if router.use_gks:
        if not router.gks_adapter_names:
            raise ConfigError(f"ArrowConfig.use_gks=True for router {router_name!r} but gks_adapter_names is empty: "
                              "provide general adapters (create_arrow_model's general_adapter_paths)")
        _subtract_general(layer, router)
    router.prototypes = _prototypes(layer, experts, router.rng_seed)


@torch.no_grad()
def _subtract_general(layer: Any, router: ArrowLoraLinearLayer) -> None:
    """GenKnowSub: each expert's ``A`` and ``B`` minus the general adapters' means, once per expert."""
    mean_a = torch.stack([layer.lora_A[g].weight for g in router.gks_adapter_names]).mean(0)
    mean_b = torch.stack([layer.lora_B[g].weight for g in router.gks_adapter_names]).mean(0)
    for name in router.task_adapter_names:
        if name in router.gks_subtracted:
            continue
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if a.shape != mean_a.shape or b.shape != mean_b.shape:
            raise ConfigError(f"GenKnowSub: task adapter {name!r} has factors of shapes {tuple(a.shape)}, "
                              f"{tuple(b.shape)}, the general adapters {tuple(mean_a.shape)}, {tuple(mean_b.shape)}")
        a.sub_(mean_a)
        b.sub_(mean_b)
        router.gks_subtracted.add(name)


@torch.no_grad()
def _prototypes(layer: Any, experts: list[str], seed: int | None) -> torch.Tensor:
    """``[experts, in_features]``: each expert's top right singular vector of ``B @ A`` by power iteration."""
    rows = []
    for name in experts:
        weight = layer.lora_B[name].weight @ layer.lora_A[name].weight
        generator = None if seed is None else torch.Generator(device=weight.device).manual_seed(seed)
        v = torch.randn(weight.shape[1], generator=generator, device=weight.device, dtype=weight.dtype)
        for _ in range(POWER_ITERATIONS):
            v = F.normalize(weight.T @ (weight @ v), dim=0)
        rows.append(v)
    return torch.stack(rows)
