"""Everything a plugin imports from the core, in one place.

Plugin packages (methods, family libraries, backends, commands) import the core only from here and
from the public top level (``peft_kernel.get_peft_model``...); ``tests/test_import_graph.py`` checks
it. What is named here is the plugin authors' contract, as stable as ``hookspecs``: the hook
marker, the records, the config and layer bases, the targeting helpers layers use, the named
errors, the checkpoint readers, the adapter-host protocol, the CLI error type and table renderer.

Importing this module stays light (no torch), so plugin entry modules and config modules may use
it: the names that live in torch-heavy core modules (``_HEAVY``) are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peft_kernel.cli import CliError, render_table
from peft_kernel.cli import main as cli_main
from peft_kernel.config import (
    CONFIG_NAME,
    MAX_SIZE,
    MAX_WIDTH,
    OMIT_DEFAULT,
    PeftConfig,
    TargetedConfig,
    TargetModulesConfig,
    check_range,
    read_settings_file,
)
from peft_kernel.enums import PeftType, TaskType
from peft_kernel.errors import (
    AdapterNameError,
    CheckpointError,
    ConfigError,
    MixedBatchError,
    PeftKernelError,
    UnsupportedFeatureError,
)
from peft_kernel.host import AdapterHost
from peft_kernel.markers import hookimpl, hookspec
from peft_kernel.model_defaults import DEFAULT_TARGET_MODULES
from peft_kernel.plugins import Registry, build_registry, get_registry, install_hint, set_registry
from peft_kernel.records import BackendRecord, MethodRecord
from peft_kernel.targeting import (
    ALL_LINEAR,
    ANY_MODEL_TYPE,
    base_of,
    compile_pattern,
    linear_fan_in_fan_out,
    pattern_value,
    standard_match,
)

if TYPE_CHECKING:  # pragma: no cover - the lazy names, for type checkers
    from peft_kernel.adapter_io import LoadResult
    from peft_kernel.checkpoint import (
        PICKLE_WEIGHTS_NAME,
        WEIGHTS_NAME,
        atomic_save_tensors,
        load_adapter_weights,
        resolve_file,
    )
    from peft_kernel.call_scope import CallScope, current_call
    from peft_kernel.compiled import compiled_rows
    from peft_kernel.containers import BufferDict
    from peft_kernel.injection import CONFIGS_ATTR, check_adapter_name, replace_with_base, wrap_modules_to_save
    from peft_kernel.layer import AdapterLayer, Fold, LowRankFactors, LowRankLayer, walk_modules
    from peft_kernel.modules_to_save import ModulesToSaveWrapper
    from peft_kernel.parameter_layer import ParameterLayer
    from peft_kernel.routing import (
        BASE_ADAPTER,
        AdapterMix,
        Routing,
        adapter_mix,
        current_adapter_mix,
        current_routing,
        current_task_ids,
    )
    from peft_kernel.tuner import is_additive
    from peft_kernel.utils import merge_utils

_HEAVY = {
    "BufferDict": "peft_kernel.containers",
    "CallScope": "peft_kernel.call_scope",
    "current_call": "peft_kernel.call_scope",
    "compiled_rows": "peft_kernel.compiled",
    "AdapterLayer": "peft_kernel.layer",
    "Fold": "peft_kernel.layer",
    "LowRankFactors": "peft_kernel.layer",
    "LowRankLayer": "peft_kernel.layer",
    "walk_modules": "peft_kernel.layer",
    "ParameterLayer": "peft_kernel.parameter_layer",
    "BASE_ADAPTER": "peft_kernel.routing",
    "Routing": "peft_kernel.routing",
    "current_routing": "peft_kernel.routing",
    "AdapterMix": "peft_kernel.routing",
    "adapter_mix": "peft_kernel.routing",
    "current_adapter_mix": "peft_kernel.routing",
    "current_task_ids": "peft_kernel.routing",
    "LoadResult": "peft_kernel.adapter_io",
    "ModulesToSaveWrapper": "peft_kernel.modules_to_save",
    "check_adapter_name": "peft_kernel.injection",
    "replace_with_base": "peft_kernel.injection",
    "wrap_modules_to_save": "peft_kernel.injection",
    "CONFIGS_ATTR": "peft_kernel.injection",
    "load_adapter_weights": "peft_kernel.checkpoint",
    "resolve_file": "peft_kernel.checkpoint",
    "WEIGHTS_NAME": "peft_kernel.checkpoint",
    "atomic_save_tensors": "peft_kernel.checkpoint",
    "PICKLE_WEIGHTS_NAME": "peft_kernel.checkpoint",
    "merge_utils": "peft_kernel.utils.merge_utils",
    "is_additive": "peft_kernel.tuner",
}
"""``{name: core module}`` of the names that import torch, imported on first access."""


def __getattr__(name: str) -> Any:
    if name in _HEAVY:
        module = importlib.import_module(_HEAVY[name])
        value = module if module.__name__.rpartition(".")[2] == name else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HEAVY})


__all__ = [
    "ALL_LINEAR",
    "ANY_MODEL_TYPE",
    "BASE_ADAPTER",
    "CONFIGS_ATTR",
    "DEFAULT_TARGET_MODULES",
    "MAX_SIZE",
    "MAX_WIDTH",
    "AdapterHost",
    "AdapterMix",
    "CONFIG_NAME",
    "PICKLE_WEIGHTS_NAME",
    "AdapterLayer",
    "AdapterNameError",
    "BackendRecord",
    "BufferDict",
    "CallScope",
    "CheckpointError",
    "CliError",
    "ConfigError",
    "Fold",
    "LoadResult",
    "LowRankFactors",
    "LowRankLayer",
    "MethodRecord",
    "MixedBatchError",
    "OMIT_DEFAULT",
    "ModulesToSaveWrapper",
    "ParameterLayer",
    "PeftConfig",
    "PeftKernelError",
    "PeftType",
    "Registry",
    "Routing",
    "TargetModulesConfig",
    "TargetedConfig",
    "TaskType",
    "UnsupportedFeatureError",
    "WEIGHTS_NAME",
    "atomic_save_tensors",
    "base_of",
    "build_registry",
    "check_adapter_name",
    "adapter_mix",
    "check_range",
    "cli_main",
    "compile_pattern",
    "compiled_rows",
    "current_adapter_mix",
    "current_routing",
    "current_task_ids",
    "get_registry",
    "hookimpl",
    "current_call",
    "hookspec",
    "install_hint",
    "is_additive",
    "linear_fan_in_fan_out",
    "load_adapter_weights",
    "merge_utils",
    "pattern_value",
    "read_settings_file",
    "replace_with_base",
    "render_table",
    "resolve_file",
    "set_registry",
    "standard_match",
    "wrap_modules_to_save",
    "walk_modules",
]
