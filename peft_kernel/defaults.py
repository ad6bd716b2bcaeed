"""The core's own hook implementations, registered like any external plugin (as ``core``).

Each is ``trylast``: a plugin implementation for its own configs or layers runs first. Heavy
modules are imported on first call, so building the registry stays cheap.
"""

from __future__ import annotations

from typing import Any, Literal

from peft_kernel.markers import hookimpl


@hookimpl(trylast=True)
def peft_kernel_match_target(config: Any, module_name: str, module: Any, model: Any) -> bool:
    from peft_kernel.targeting import standard_match

    return standard_match(config, module_name)


@hookimpl(trylast=True)
def peft_kernel_merge(layer: Any, adapter_name: str, safe_merge: bool, direction: Literal["merge", "unmerge"]) -> bool:
    return layer.fold_adapter(adapter_name, safe_merge, direction)


@hookimpl(trylast=True)
def peft_kernel_create_host(record: Any, model: Any, config: Any, adapter_name: str) -> Any:
    from peft_kernel.tuner import tuner_class

    return tuner_class(record.tuner_name, record.tuner_mixin)(model, config, adapter_name)
