"""Everything a plugin imports from the core, in one place.

Plugin packages (methods, family libraries, backends, commands) import the core only from here and
from the public top level (``peft_kernel.get_peft_model``...); ``tests/test_import_graph.py`` checks
it. What is named here is the plugin authors' contract, as stable as ``hookspecs``: the hook
marker, the records, the config and layer bases, the targeting helpers layers use, the named
errors, the checkpoint readers and the CLI error type.

Names whose modules import torch (the layer base, routing, merge utilities, checkpoint readers)
load on first access, so a plugin's entry module importing from here stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peft_kernel.cli import CliError
from peft_kernel.config import (
    MAX_SIZE,
    MAX_WIDTH,
    PeftConfig,
    TargetedConfig,
    TargetModulesConfig,
    check_range,
    read_settings_file,
)
from peft_kernel.enums import PeftType, TaskType
from peft_kernel.errors import (
    CheckpointError,
    ConfigError,
    MixedBatchError,
    PeftKernelError,
    UnsupportedFeatureError,
)
from peft_kernel.markers import hookimpl, hookspec
from peft_kernel.model_defaults import DEFAULT_TARGET_MODULES
from peft_kernel.plugins import Registry, get_registry, install_hint
from peft_kernel.records import BackendRecord, MethodRecord
from peft_kernel.targeting import base_of, compile_pattern, linear_fan_in_fan_out, pattern_value

if TYPE_CHECKING:  # pragma: no cover - annotations only; loaded lazily below
    from peft_kernel.checkpoint import load_adapter_weights, resolve_file
    from peft_kernel.layer import AdapterLayer, Fold
    from peft_kernel.routing import Routing, current_routing
    from peft_kernel.utils import merge_utils

_LAZY = {
    "AdapterLayer": "peft_kernel.layer",
    "Fold": "peft_kernel.layer",
    "Routing": "peft_kernel.routing",
    "current_routing": "peft_kernel.routing",
    "load_adapter_weights": "peft_kernel.checkpoint",
    "resolve_file": "peft_kernel.checkpoint",
    "merge_utils": "peft_kernel.utils.merge_utils",  # a module
}

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "MAX_SIZE",
    "MAX_WIDTH",
    "AdapterLayer",
    "BackendRecord",
    "CheckpointError",
    "CliError",
    "ConfigError",
    "Fold",
    "MethodRecord",
    "MixedBatchError",
    "PeftConfig",
    "PeftKernelError",
    "PeftType",
    "Registry",
    "Routing",
    "TargetModulesConfig",
    "TargetedConfig",
    "TaskType",
    "UnsupportedFeatureError",
    "base_of",
    "check_range",
    "compile_pattern",
    "current_routing",
    "get_registry",
    "hookimpl",
    "hookspec",
    "install_hint",
    "linear_fan_in_fan_out",
    "load_adapter_weights",
    "merge_utils",
    "pattern_value",
    "read_settings_file",
    "resolve_file",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
