"""Everything a plugin imports from the core, in one place.

Plugin packages (methods, family libraries, backends, commands) import the core only from here and
from the public top level (``peft_kernel.get_peft_model``...); ``tests/test_import_graph.py`` checks
it. What is named here is the plugin authors' contract, as stable as ``hookspecs``: the hook
marker, the records, the config and layer bases, the targeting helpers layers use, the named
errors, the checkpoint readers and the CLI error type and table renderer.
"""

from __future__ import annotations

from peft_kernel.checkpoint import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter_weights, resolve_file
from peft_kernel.cli import CliError, render_table
from peft_kernel.config import CONFIG_NAME, MAX_SIZE, MAX_WIDTH, PeftConfig, check_range, read_settings_file
from peft_kernel.enums import PeftType, TaskType
from peft_kernel.errors import (
    CheckpointError,
    ConfigError,
    MixedBatchError,
    PeftKernelError,
    UnsupportedFeatureError,
)
from peft_kernel.layer import AdapterLayer, Fold
from peft_kernel.markers import hookimpl, hookspec
from peft_kernel.model_defaults import DEFAULT_TARGET_MODULES
from peft_kernel.plugins import Registry, get_registry, install_hint
from peft_kernel.records import BackendRecord, MethodRecord
from peft_kernel.routing import Routing, current_routing
from peft_kernel.targeting import base_of, compile_pattern, linear_fan_in_fan_out, pattern_value
from peft_kernel.utils import merge_utils

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_TARGET_MODULES",
    "MAX_SIZE",
    "MAX_WIDTH",
    "PICKLE_WEIGHTS_NAME",
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
    "TaskType",
    "UnsupportedFeatureError",
    "WEIGHTS_NAME",
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
    "render_table",
    "resolve_file",
]
