"""Which modules a config targets, with HF PEFT's rules.

``target_modules`` is a list (a name matches when it equals an entry or ends with ``"." + entry``),
a regex string (full match of the dotted name), or ``"all-linear"`` (every linear layer but the
output layer). ``exclude_modules`` uses the same forms. ``layers_to_transform`` keeps only modules
whose layer index (the number after ``layers_pattern``, or after any segment when no pattern is
given) is listed. ``rank_pattern`` / ``alpha_pattern`` keys match the end of a dotted name.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from peft_kernel.errors import ConfigError, TargetNotFoundError
from peft_kernel.records import MethodRecord

if TYPE_CHECKING:  # torch is imported where it is used: configs validate their regexes here, light
    from torch import nn

ALL_LINEAR = "all-linear"
ANY_MODEL_TYPE = "*"
"""Key of a ``MethodRecord.default_target_modules`` entry used for every model type the table does
not name, models without a ``config`` included (a method whose default is ``"all-linear"``)."""


@functools.lru_cache(maxsize=1024)
def compile_pattern(regex: str, field: str, given: str | None = None) -> re.Pattern[str]:
    """``regex`` compiled, or a :class:`ConfigError` naming the config field and the value given
    there (``given``, when ``regex`` wraps it)."""
    try:
        return re.compile(regex)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        shown = regex if given is None else given
        raise ConfigError(f"{field}: {shown!r} is not a valid regular expression ({exc})") from None


def layer_regex(layers_pattern: str) -> re.Pattern[str]:
    """How HF PEFT finds the layer index after one ``layers_pattern`` entry."""
    return compile_pattern(rf".*\.{layers_pattern}\.(\d+)\.", "layers_pattern", layers_pattern)


def pattern_key_regex(key: str, field: str = "rank_pattern") -> re.Pattern[str]:
    """How HF PEFT matches a ``rank_pattern`` / ``alpha_pattern`` key against the end of a name."""
    return compile_pattern(rf"(.*\.)?({key})$", f"{field} key", key)


def check_patterns(config: Any) -> None:
    """Compile every regex a config carries in the fields the standard matcher reads
    (``target_modules`` / ``exclude_modules`` as a string, ``layers_pattern``, the keys of
    ``rank_pattern`` / ``alpha_pattern``), so an invalid one is a :class:`ConfigError` when the
    config is made, not a ``re.error`` in the middle of injection."""
    owner = type(config).__name__
    try:
        for field in ("target_modules", "exclude_modules"):
            value = getattr(config, field, None)
            if isinstance(value, str):
                compile_pattern(value, f"{owner}.{field}")
        layers = getattr(config, "layers_pattern", None)
        for pattern in [layers] if isinstance(layers, str) else layers if isinstance(layers, (list, tuple)) else ():
            if isinstance(pattern, str):
                layer_regex(pattern)
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(config, field, None) or {}:
                if isinstance(key, str):
                    pattern_key_regex(key, field)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(owner) else f"{owner}.{message}") from None


def _matches_names(spec: Any, key: str) -> bool:
    if isinstance(spec, str):
        return compile_pattern(spec, "target_modules / exclude_modules").fullmatch(key) is not None
    return any(key == t or key.endswith("." + t) for t in spec)


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    if not patterns:
        found = re.match(r".*\.[^.]*\.(\d+)\.", key)
        return int(found.group(1)) if found else None
    for pattern in patterns:
        found = layer_regex(pattern).match(key)
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
        if key == pattern or pattern_key_regex(pattern).match(key):
            return value
    return default


def is_linear(module: nn.Module) -> bool:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def base_of(module: nn.Module) -> nn.Module:
    """The wrapped layer of an adapter layer (the innermost one when layers are stacked, as in mixed
    models), else the module itself."""
    while getattr(module, "_modules", {}).get("base_layer") is not None:
        module = module._modules["base_layer"]
    return module


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module a config could target: adapter layers and ``modules_to_save`` wrappers
    themselves, never their insides (the model itself excluded)."""
    from peft_kernel.layer import AdapterLayer, walk_modules
    from peft_kernel.modules_to_save import ModulesToSaveWrapper

    return ((path, m) for path, m in walk_modules(model, stop=(AdapterLayer, ModulesToSaveWrapper)) if path)


def expand_target_modules(config: Any, model: nn.Module, record: MethodRecord) -> None:
    """Resolve ``target_modules=None`` (model-type defaults, the :data:`ANY_MODEL_TYPE` entry for
    the others) and ``"all-linear"`` (also as a default) in place, as HF does."""
    targets = getattr(config, "target_modules", "<no field>")
    if targets == "<no field>":
        return
    if targets is None and getattr(config, "target_parameters", None):
        config.target_modules = set()  # HF PEFT: parameter targets alone, no model-type default modules
        return
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        table = record.default_target_modules
        defaults = table.get(model_type or "", table.get(ANY_MODEL_TYPE))
        if defaults is not None:  # else the method's prepare_config may resolve it (check_targets_resolved)
            config.target_modules = targets = defaults if isinstance(defaults, str) else set(defaults)  # a regex stays one
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        config.target_modules = {
            name for name, module in candidate_modules(model)
            if is_linear(base_of(module)) and base_of(module) is not output
        }


def check_targets_resolved(config: Any, model: nn.Module) -> None:
    """After the defaults and the method's ``prepare_config``: ``target_modules`` must be set."""
    if getattr(config, "target_modules", "<no field>") is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise TargetNotFoundError(
            f"{type(config).__name__}.target_modules is not set and there is no default for "
            f"model_type {model_type!r}; pass target_modules=[...] (module names such as 'q_proj') "
            f"or target_modules='all-linear'."
        )


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

    from torch import nn
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
