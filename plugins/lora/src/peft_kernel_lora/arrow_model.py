"""``create_arrow_model``: load task (and general) LoRA adapters and add an Arrow router over them."""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from peft_kernel.plugin_api import ConfigError
from peft_kernel_lora.arrow_config import ArrowConfig
from peft_kernel_lora.config import LoraConfig

ROUTER_NAME = "arrow_router"


def create_arrow_model(base_model: nn.Module, task_specific_adapter_paths: list[str], arrow_config: ArrowConfig,
                       general_adapter_paths: list[str] | None = None, **adapter_kwargs: Any) -> Any:
    """HF PEFT's ``create_arrow_model``: the task adapters are loaded as ``task_<i>``, the general
    ones (used only with ``arrow_config.use_gks``) as ``gks_<j>``, all with ``adapter_kwargs``;
    they must share rank, targeted modules and shapes. A LoRA adapter named ``"arrow_router"``
    whose ``arrow_config`` names them is then added and made the active adapter."""
    from peft_kernel import PeftModel

    if not isinstance(arrow_config, ArrowConfig):
        raise ConfigError(f"create_arrow_model: arrow_config must be an ArrowConfig, got {type(arrow_config).__name__}")
    if not task_specific_adapter_paths:
        raise ConfigError("create_arrow_model: `task_specific_adapter_paths` should contain at least one adapter path")
    general = list(general_adapter_paths or []) if arrow_config.use_gks else []
    if arrow_config.use_gks and not general:
        raise ConfigError("create_arrow_model: You should provide general LoRA paths if you want to use GenKnowSub "
                          "(arrow_config.use_gks=True needs general_adapter_paths).")
    task_names = [f"task_{i}" for i in range(len(task_specific_adapter_paths))]
    gks_names = [f"gks_{j}" for j in range(len(general))]
    paths = dict(zip((*task_names, *gks_names), (*task_specific_adapter_paths, *general)))
    model = PeftModel.from_pretrained(base_model, paths[task_names[0]], adapter_name=task_names[0], **adapter_kwargs)
    for name, path in list(paths.items())[1:]:
        model.load_adapter(path, adapter_name=name, **adapter_kwargs)
    _check_alike(model, list(paths))
    first = model.peft_config[task_names[0]]
    router = attrs.evolve(arrow_config, task_adapter_names=task_names, gks_adapter_names=gks_names)
    model.add_adapter(ROUTER_NAME, LoraConfig(r=first.r, target_modules=first.target_modules, arrow_config=router))
    model.set_adapter(ROUTER_NAME)
    return model


def _check_alike(model: Any, names: list[str]) -> None:
    """Every adapter has the first one's rank, and every LoRA layer holds all of them or none, with equal shapes."""
    from peft_kernel_lora.layers import LoraLayer

    first = names[0]
    for name in names[1:]:
        r, r0 = model.peft_config[name].r, model.peft_config[first].r
        if r != r0:
            raise ConfigError(f"create_arrow_model: [{name}] rank mismatch: {r} != {r0}")
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        held = [n for n in names if n in module.lora_A]
        if not held:
            continue
        if len(held) != len(names):
            missing = [n for n in names if n not in held]
            raise ConfigError(f"create_arrow_model: adapters {missing} do not target {module_name!r} while "
                              f"{held} do; all Arrow adapters must target the same modules")
        shapes = {n: (tuple(module.lora_A[n].weight.shape), tuple(module.lora_B[n].weight.shape)) for n in names}
        for name in names[1:]:
            if shapes[name] != shapes[first]:
                raise ConfigError(f"create_arrow_model: [{name}] shape mismatch in {module_name!r}: "
                                  f"{shapes[name]} != {shapes[first]}")
