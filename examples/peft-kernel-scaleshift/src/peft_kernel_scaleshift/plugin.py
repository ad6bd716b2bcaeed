"""Entry module of peft-kernel-scaleshift (``[project.entry-points.peft_kernel]``).

The core imports this module when it builds its plugin registry and collects the functions marked
``@hookimpl``. Keep it cheap: no torch-heavy imports at module level.
"""

from __future__ import annotations

from typing import Any, Callable

from peft_kernel.markers import hookimpl
from peft_kernel.records import MethodRecord
from peft_kernel_scaleshift.config import PEFT_TYPE, ScaleShiftConfig

# Renamed keys: version 0.0 of this plugin saved ``ss_gamma`` / ``ss_beta``.
LEGACY_KEYS = {".ss_gamma": ".ss_scale", ".ss_beta": ".ss_shift"}


@hookimpl
def peft_kernel_register_methods(register: Callable[[MethodRecord], None]) -> None:
    """Tell the core that ``peft_type="SCALESHIFT"`` exists, which config class reads it, which
    state-dict prefix marks its tensors and which capabilities the conformance suite may check."""
    register(
        MethodRecord(
            peft_type=PEFT_TYPE,
            config_class=ScaleShiftConfig,
            prefix="ss_",
            capabilities={"mergeable", "mixed_batch", "multi_adapter"},
            tuner_name="ScaleShiftModel",
            default_target_modules={"llama": ["down_proj"], "mistral": ["down_proj"]},
            exports={"ScaleShiftLinear": "peft_kernel_scaleshift.layers:ScaleShiftLinear"},
        )
    )


@hookimpl
def peft_kernel_create_layer(config: Any, adapter_name: str, base_layer: Any, module_name: str) -> Any:
    """Wrap an ``nn.Linear`` for a ScaleShift config; ``None`` for anything else (not ours)."""
    if not isinstance(config, ScaleShiftConfig):
        return None
    from torch import nn

    if not isinstance(base_layer, nn.Linear):
        return None  # the core then raises an error naming the module and its type
    from peft_kernel_scaleshift.layers import ScaleShiftLinear

    layer = ScaleShiftLinear(base_layer)
    layer.update_layer(adapter_name, config, module_name)
    return layer


@hookimpl
def peft_kernel_map_state_dict(config: Any, state_dict: dict[str, Any], direction: str) -> dict[str, Any] | None:
    """Read checkpoints of the older key names; ``None`` (leave unchanged) otherwise."""
    if direction != "load" or not isinstance(config, ScaleShiftConfig):
        return None
    renamed = {}
    for key, value in state_dict.items():
        for old, new in LEGACY_KEYS.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        renamed[key] = value
    return renamed if renamed.keys() != state_dict.keys() else None
