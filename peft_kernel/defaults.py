"""The core's own hook implementations, registered like any external plugin (as ``core``).

Each is ``trylast``: a plugin implementation for its own configs or layers runs first.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from peft_kernel.markers import hookimpl
from peft_kernel.targeting import standard_match


@hookimpl(trylast=True)
def peft_kernel_match_target(config: Any, module_name: str, module: nn.Module, model: nn.Module) -> bool:
    return standard_match(config, module_name)


@hookimpl(trylast=True)
def peft_kernel_merge(layer: Any, adapter_name: str, safe_merge: bool, direction: Literal["merge", "unmerge"]) -> bool:
    if direction == "merge":
        layer.merge_into_base(adapter_name, safe_merge=safe_merge)
    else:
        layer.unmerge_from_base(adapter_name)
    return True
