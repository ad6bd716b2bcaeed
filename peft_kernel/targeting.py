"""Which modules a config targets, with HF PEFT's rules.

``target_modules`` is a list (a name matches when it equals an entry or ends with ``"." + entry``),
a regex string (full match of the dotted name), or ``"all-linear"`` (every linear layer but the
output layer). ``exclude_modules`` uses the same forms. ``layers_to_transform`` keeps only modules
whose layer index (the number after ``layers_pattern``, or after any segment when no pattern is
given) is listed. ``rank_pattern`` / ``alpha_pattern`` keys match the end of a dotted name.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterator, Mapping

from torch import nn

from peft_kernel.errors import TargetNotFoundError
from peft_kernel.records import MethodRecord

ALL_LINEAR = "all-linear"


def _matches_names(spec: Any, key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key == t or key.endswith("." + t) for t in spec)


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    if not patterns:
        found = re.match(r".*\.[^.]*\.(\d+)\.", key)
        return int(found.group(1)) if found else None
    for pattern in patterns:
        found = re.match(rf".*\.{pattern}\.(\d+)\.", key)
        if found:
            return int(found.group(1))
    return None


def standard_match(config: Any, module_name: str) -> bool:
    """HF PEFT's target rule for ``module_name`` (names only; layer types are checked later)."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude and _matches_names(exclude, module_name):
        return False
    targets = getattr(config, "target_modules", None)
    if targets is None or not _matches_names(targets, module_name):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or layers == []:
        return True
    index = _layer_index(module_name, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    """The value of the first pattern whose regex matches the end of ``key`` (HF PEFT's rule)."""
    for pattern, value in (patterns or {}).items():
        if key == pattern or re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def base_of(module: nn.Module) -> nn.Module:
    """The wrapped layer of an adapter layer, else the module itself."""
    return getattr(module, "base_layer", module)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module a config could target: adapter layers and ``modules_to_save`` wrappers
    themselves, never their insides (the model itself excluded)."""
    from peft_kernel.layer import AdapterLayer, walk_modules
    from peft_kernel.modules_to_save import ModulesToSaveWrapper

    return ((path, m) for path, m in walk_modules(model, stop=(AdapterLayer, ModulesToSaveWrapper)) if path)


def expand_target_modules(config: Any, model: nn.Module, record: MethodRecord) -> None:
    """Resolve ``target_modules=None`` (model-type defaults) and ``"all-linear"`` in place, as HF does."""
    targets = getattr(config, "target_modules", "<no field>")
    if targets == "<no field>":
        return
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = record.default_target_modules.get(model_type or "")
        if defaults is None:
            raise TargetNotFoundError(
                f"{type(config).__name__}.target_modules is not set and there is no default for "
                f"model_type {model_type!r}; pass target_modules=[...] (module names such as 'q_proj') "
                f"or target_modules='all-linear'."
            )
        config.target_modules = defaults if isinstance(defaults, str) else set(defaults)  # a regex stays one
    elif isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        config.target_modules = {
            name for name, module in candidate_modules(model)
            if is_linear(base_of(module)) and base_of(module) is not output
        }


MIN_TARGETS_TO_COMPRESS = 20
"""From this many targeted modules on, ``target_modules`` is stored as minimal suffixes (as HF PEFT does)."""


def minimal_suffixes(targeted: list[str], all_names: list[str]) -> set[str]:
    """The shortest dotted suffix of each targeted name that matches no other module name."""
    chosen = set(targeted)
    taken: set[str] = set()
    for name in all_names:
        if name not in chosen:
            parts = name.split(".")
            taken.update(".".join(parts[i:]) for i in range(len(parts)))
    result: set[str] = set()
    for name in targeted:
        parts = name.split(".")
        result.add(next((".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1) if ".".join(parts[i:]) not in taken), name))
    return result


def compress_target_modules(config: Any, model: nn.Module, targeted: list[str]) -> None:
    """Store long lists of targets as minimal suffixes, so the saved config stays readable."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (set, list)) and len(targeted) >= MIN_TARGETS_TO_COMPRESS:
        config.target_modules = minimal_suffixes(targeted, [n for n, _ in candidate_modules(model)])


def no_match_error(config: Any, model: nn.Module) -> TargetNotFoundError:
    """An error listing module names close to the requested targets."""
    names = [n for n, _ in candidate_modules(model)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    targets = getattr(config, "target_modules", None)
    wanted = [targets] if isinstance(targets, str) else sorted(targets or [])
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)})
    hint = f" Close module names: {close}." if close else ""
    layers = getattr(config, "layers_to_transform", None)
    layer_note = f" (with layers_to_transform={layers}, layers_pattern={getattr(config, 'layers_pattern', None)})" if layers else ""
    return TargetNotFoundError(
        f"Target modules {wanted}{layer_note} not found in the base model {type(model).__name__}.{hint} "
        f"Leaf module names in this model include: {leaves[:25]}."
    )


def linear_fan_in_fan_out(config: Any, base_layer: nn.Module) -> bool | None:
    """For a linear-like ``base_layer``: whether its weight is stored [in, out] (transformers'
    ``Conv1D``), recording the answer in ``config.fan_in_fan_out`` with HF PEFT's warnings when the
    config said otherwise. ``None`` when ``base_layer`` is not linear-like."""
    import warnings

    from transformers.pytorch_utils import Conv1D

    if isinstance(base_layer, Conv1D):
        if not getattr(config, "fan_in_fan_out", True):
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.", UserWarning, stacklevel=3)
        config.fan_in_fan_out = True
        return True
    if isinstance(base_layer, nn.Linear):
        if getattr(config, "fan_in_fan_out", False):
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.", UserWarning, stacklevel=3)
            config.fan_in_fan_out = False
        return False
    return None
