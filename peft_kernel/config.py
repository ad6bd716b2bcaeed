"""``PeftConfig``: the attrs base of every method's config, and ``adapter_config.json`` I/O.

One strict cattrs converter structures every config: ``r="8"`` is an error, not a silent cast.
Errors carry the JSON path and the expected type (``$.r: expected int, got str '8'``). Keys that
newer HF PEFT versions write and this config does not know are dropped with a warning naming them.
"""

from __future__ import annotations

import enum
import json
import math
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import attrs
import cattrs

from peft_kernel.checkpoint import CONFIG_NAME, atomic_write_text, resolve_file
from peft_kernel.enums import PeftType, TaskType
from peft_kernel.errors import ConfigError, PeftKernelError

FORMAT_VERSION = "0.21.2"
"""The HF PEFT checkpoint format these configs follow, written as ``peft_version``."""
_NONE = type(None)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    return "null" if tp is _NONE else getattr(tp, "__name__", repr(tp))


class _Mismatch(TypeError):
    """A value of the wrong JSON type; the message already names expected and actual."""


def _mismatch(value: Any, tp: Any) -> _Mismatch:
    try:
        shown = _short(value)
    except RecursionError:
        shown = "(nested too deeply to show)"
    return _Mismatch(f"expected {_type_name(tp)}, got {type(value).__name__} {shown}")


def _strict_scalar(tp: type):
    def hook(value: Any, _: Any) -> Any:
        ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise _mismatch(value, tp)
        return value

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)
    for tp in (int, float, str, bool):
        conv.register_structure_hook(tp, _strict_scalar(tp))
    conv.register_structure_hook(Any, lambda v, _: v)

    def is_union(tp: Any) -> bool:
        return typing.get_origin(tp) in (Union, types.UnionType)

    def union_factory(tp: Any):
        members = typing.get_args(tp)

        def hook(value: Any, _: Any) -> Any:
            if value is None:
                if _NONE in members:
                    return None
                raise _mismatch(value, tp)
            real = [m for m in members if m is not _NONE]
            for member in real:
                try:
                    return conv.structure(value, member)
                except _Mismatch as exc:
                    if len(real) == 1 and str(exc).startswith("item "):
                        raise  # Optional[dict[str, int]]: say which item is wrong
                    continue
                except Exception:
                    continue
            raise _mismatch(value, tp)

        return hook

    conv.register_structure_hook_factory(is_union, union_factory)

    def is_literal(tp: Any) -> bool:
        return typing.get_origin(tp) is Literal

    def literal_factory(tp: Any):
        allowed = typing.get_args(tp)

        def hook(value: Any, _: Any) -> Any:
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise _mismatch(value, tp)
            return value

        return hook

    conv.register_structure_hook_factory(is_literal, literal_factory)

    def is_collection(tp: Any) -> bool:
        return typing.get_origin(tp) in (list, set, frozenset, tuple)

    def collection_factory(tp: Any):
        origin, args = typing.get_origin(tp), typing.get_args(tp)

        def hook(value: Any, _: Any) -> Any:
            if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple, set, frozenset)):
                raise _mismatch(value, tp)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise _mismatch(value, tp)
                return tuple(_item(v, a, i, tp) for i, (v, a) in enumerate(zip(value, args)))
            return origin(_item(v, args[0] if args else Any, i, tp) for i, v in enumerate(value))

        return hook

    def _item(value: Any, tp: Any, index: int, outer: Any) -> Any:
        try:
            return conv.structure(value, tp)
        except Exception as exc:
            raise _Mismatch(f"item [{index}]: {exc}") from None

    conv.register_structure_hook_factory(is_collection, collection_factory)

    def is_mapping(tp: Any) -> bool:
        return tp is dict or typing.get_origin(tp) is dict

    def mapping_factory(tp: Any):
        args = typing.get_args(tp)
        key_type, value_type = args if len(args) == 2 else (Any, Any)

        def hook(value: Any, _: Any) -> Any:
            if not isinstance(value, dict):
                raise _mismatch(value, tp)
            out = {}
            for key, item in value.items():
                try:
                    out[conv.structure(key, key_type)] = conv.structure(item, value_type)
                except Exception as exc:
                    raise _Mismatch(f"item [{key!r}]: {exc}") from None
            return out

        return hook

    conv.register_structure_hook_factory(is_mapping, mapping_factory)
    for enum_type in (PeftType, TaskType):
        conv.register_structure_hook(enum_type, _enum_hook(enum_type))
    conv.register_unstructure_hook(set, lambda s: sorted(s))
    conv.register_unstructure_hook(frozenset, lambda s: sorted(s))
    conv.register_unstructure_hook(tuple, list)
    return conv


def _enum_hook(enum_type: type[enum.Enum]):
    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, enum_type):
            return value
        if not isinstance(value, str):
            raise _mismatch(value, str)
        try:
            return enum_type(value.upper())
        except ValueError:
            # a peft_type unknown to the enum may still come from a third-party plugin
            if enum_type is PeftType:
                return value
            raise _Mismatch(f"expected one of {[e.value for e in enum_type]}, got {value!r}") from None

    return hook


converter = _make_converter()

MAX_SIZE = 1 << 16
"""Upper bound of ranks, block sizes and counts (virtual tokens, layers, heads): 65,536. Nothing
real comes near it; a larger value is a typo or a hostile file and would only exhaust memory."""
MAX_WIDTH = 1 << 20
"""Upper bound of widths (``token_dim``, ``encoder_hidden_size``): 1,048,576."""


def check_range(owner: str, path: str, value: Any, low: int, high: int, hint: str = "") -> None:
    """Raise :class:`ConfigError` (``"LoraConfig: $.r must be ..."``) unless ``low <= value <= high``
    for an int ``value``. Plugins call it for their size fields."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{owner}: $.{path} must be an integer from {low} to {high:,}, got {_short(value)}{hint}")


def _short(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**12:
        return f"an integer of {len(str(abs(value)))} digits" if abs(value) < 10**4000 else "an integer too large to print"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_FIELD_TYPES: dict[type, list[tuple[str, Any]]] = {}


def _field_types(cls: type) -> list[tuple[str, Any]]:
    """``(name, resolved type)`` of every init field of ``cls`` (``Any`` where a type does not resolve)."""
    cached = _FIELD_TYPES.get(cls)
    if cached is None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # a locally defined config class naming local types: check what resolves
            hints = {}
        cached = [(f.name, hints.get(f.name, Any if isinstance(f.type, str) or f.type is None else f.type))
                  for f in attrs.fields(cls) if f.init]
        _FIELD_TYPES[cls] = cached
    return cached


def _non_finite(value: Any, depth: int = 0) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if depth < 8 and isinstance(value, (list, tuple, set, frozenset)):
        return any(_non_finite(v, depth + 1) for v in value)
    if depth < 8 and isinstance(value, dict):
        return any(_non_finite(v, depth + 1) for v in value.values())
    return False


MAX_NESTING = 32
"""How deeply a config value may nest lists and dicts (HF PEFT's deepest field nests 3 levels)."""


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests containers more than :data:`MAX_NESTING` levels (checked without recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, set, frozenset, dict)):
            if depth >= MAX_NESTING:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def check_field_types(config: Any) -> None:
    """Every field of ``config`` against its annotation, with the converter's strict rules (what
    ``from_dict`` applies to JSON also holds for ``LoraConfig(r="8")``), and no NaN or infinity."""
    problems = []
    for name, tp in _field_types(type(config)):
        value = getattr(config, name)
        if _too_deep(value):
            problems.append(f"$.{name}: nested more than {MAX_NESTING} levels deep")
            continue
        try:
            converter.structure(value, tp)
        except RecursionError:
            problems.append(f"$.{name}: nested too deeply")
            continue
        except Exception as exc:
            problems.append(f"$.{name}: {_format(exc, tp)}")
            continue
        try:
            bad = _non_finite(value)
        except RecursionError:  # pragma: no cover - bounded depth above
            bad = True
        if bad:
            problems.append(f"$.{name}: NaN and infinity are not valid here, got {_short(value)}")
    if problems:
        raise ConfigError(f"invalid {type(config).__name__}: " + "; ".join(problems))


def _format(exc: BaseException, tp: Any) -> str:
    if isinstance(exc, _Mismatch):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required field missing"
    return f"{type(exc).__name__}: {exc}" + (f" (expected {_type_name(tp)})" if tp is not None else "")


def _config_field_names(cls: type) -> set[str]:
    return {f.name for f in attrs.fields(cls) if f.init}


OMIT_DEFAULT = "peft_kernel_omit_default"
"""Field metadata key: the field is ours, not HF PEFT's; ``to_dict`` leaves it out at its default."""


@attrs.define(kw_only=True)
class PeftConfig:
    """Base of every adapter config. Field names and defaults follow HF PEFT's ``PeftConfig``."""

    peft_type: Optional[Union[PeftType, str]] = None
    task_type: Optional[Union[TaskType, str]] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None

    def __attrs_post_init__(self) -> None:
        check_field_types(self)
        from peft_kernel.targeting import check_patterns

        check_patterns(self)
        if self.peft_version is None:
            self.peft_version = FORMAT_VERSION
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            try:
                self.task_type = TaskType(self.task_type.upper())
            except ValueError:
                raise ConfigError(
                    f"task_type {self.task_type!r} is not one of {[t.value for t in TaskType]}"
                ) from None
        if isinstance(self.peft_type, str) and not isinstance(self.peft_type, PeftType):
            try:
                self.peft_type = PeftType(self.peft_type.upper())
            except ValueError:
                pass

    # ---- HF PEFT properties -------------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with HF PEFT's keys (enums as their string values). A field of ours
        that HF PEFT does not know (``metadata={OMIT_DEFAULT: True}``) is written only when it differs
        from its default, so HF PEFT reads our configs without warnings about unknown keys."""
        raw = converter.unstructure(self)
        for field in attrs.fields(type(self)):
            if field.metadata.get(OMIT_DEFAULT) and getattr(self, field.name) == field.default:
                raw.pop(field.name, None)
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in raw.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "") -> PeftConfig:
        """Build the config from a dict as found in ``adapter_config.json``.

        Unknown keys are dropped with a warning; wrong types raise :class:`ConfigError` naming the
        JSON path. Called on ``PeftConfig`` itself, dispatches on ``peft_type`` to the plugin's class.
        """
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}$: expected a JSON object, got {type(data).__name__}")
        target = cls
        if cls is PeftConfig or not cls._declares_peft_type():
            if "peft_type" not in data:
                raise ConfigError(f"{where}$.peft_type: required field missing (which PEFT method is this?)")
            from peft_kernel.plugins import get_registry

            peft_type = data["peft_type"]
            if not isinstance(peft_type, str) or not peft_type:
                raise ConfigError(f"{where}$.peft_type: expected the name of a PEFT method, got {_short(peft_type)}")
            target = get_registry().method(peft_type).config_class
        known = _config_field_names(target)
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"{where}dropping config keys unknown to {target.__name__} "
                f"(written by a newer HF PEFT?): {', '.join(unknown)}",
                UserWarning,
                stacklevel=2,
            )
        clean = {k: v for k, v in data.items() if k in known}
        try:
            return converter.structure(clean, target)
        except cattrs.ClassValidationError as exc:
            own = [e for e in exc.exceptions if isinstance(e, PeftKernelError)]
            if own and len(own) == len(exc.exceptions):  # the class's own checks: their message says it all
                raise type(own[0])(f"{where}{own[0]}") from None
            problems = cattrs.transform_error(exc, path="$", format_exception=_format)
            raise ConfigError(
                f"{where}invalid {target.__name__}: " + "; ".join(_path_first(p) for p in problems)
            ) from None
        except ConfigError as exc:
            if where and not str(exc).startswith(where):
                raise ConfigError(f"{where}{exc}") from None
            raise
        except RecursionError:
            raise ConfigError(f"{where}invalid {target.__name__}: a value is nested too deeply") from None
        except (TypeError, ValueError, OverflowError, KeyError, AttributeError, IndexError) as exc:
            # a config class's own check tripping over data of an unexpected shape
            raise ConfigError(f"{where}invalid {target.__name__}: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def _declares_peft_type(cls) -> bool:
        return attrs.fields_dict(cls)["peft_type"].default is not None

    @classmethod
    def from_json_file(cls, path: str | Path) -> dict[str, Any]:
        """Read a config file and return its dict (as HF PEFT's ``from_json_file``)."""
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); is it an adapter_config.json?") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path} nests JSON arrays or objects too deeply to be an adapter config") from None
        except ValueError as exc:  # e.g. an integer of more than 4,300 digits
            raise ConfigError(f"{path} is not a usable JSON config: {exc}") from None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Load a config from a local folder or a Hub repo id (offline from the cache works)."""
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        data = cls.from_json_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: $: expected a JSON object, got {type(data).__name__}")
        data.update(kwargs)
        return cls.from_dict(data, source=str(path))

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` (sorted keys, as HF PEFT) atomically into ``save_directory``."""
        data = self.to_dict()
        data.update(kwargs)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(save_directory) / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True))

    def copy(self) -> PeftConfig:
        return attrs.evolve(self)

    def rewrites_base_weights(self) -> bool:
        """Whether creating this adapter changes the weights of the base layers it targets (an
        initialisation such as PiSSA that moves part of the weight into the adapter). Loads then
        snapshot those layers first, so that a failed load can put them back. Default: False."""
        return False


@attrs.define(kw_only=True)
class TargetModulesConfig(PeftConfig):
    """Base of a layer method's config that, like HF PEFT's ``IA3Config``, chooses modules by name
    only: declares ``target_modules``, ``exclude_modules`` and ``modules_to_save`` with HF PEFT's
    types and defaults, and turns a list of module names into a set, as HF PEFT does. The core's
    standard matcher (:func:`peft_kernel.targeting.standard_match`) reads these fields."""

    target_modules: Optional[Union[list[str], set[str], str]] = None
    exclude_modules: Optional[Union[list[str], set[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))


@attrs.define(kw_only=True)
class TargetedConfig(TargetModulesConfig):
    """Base of a layer method's config (LoRA, LoHa, OFT...): the fields of
    :class:`TargetModulesConfig` plus HF PEFT's layer selection, ``layers_to_transform`` (layer
    indices) and ``layers_pattern`` (the name of the layer list), with HF PEFT's rules: neither with
    a regex ``target_modules``, and ``layers_pattern`` only with ``layers_to_transform``."""

    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if isinstance(self.target_modules, str):
            if self.layers_to_transform is not None:
                raise ConfigError("`layers_to_transform` cannot be used when `target_modules` is a str.")
            if self.layers_pattern is not None:
                raise ConfigError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")


def _path_first(problem: str) -> str:
    """cattrs writes 'message @ $.path'; we lead with the path."""
    message, _, path = problem.rpartition(" @ ")
    return f"{path}: {message}" if message else problem


def read_settings_file(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping held by a ``.yaml`` / ``.yml`` / ``.json`` settings file (a training or export
    config, as opposed to ``adapter_config.json``). Every problem is a :class:`ConfigError` whose
    message starts with ``what`` (e.g. ``"--config run.yaml"``); YAML needs PyYAML."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: not UTF-8 text") from None
    suffix = file.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{what}: YAML needs PyYAML (pip install pyyaml), or use a .json file") from None
        try:
            data = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"{what}: not valid YAML: {' '.join(str(exc).split())}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ConfigError(f"{what}: not valid JSON: {exc}") from None
    else:
        raise ConfigError(f"{what}: the file must end in .yaml, .yml or .json")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a mapping of settings, got a {type(data).__name__}")
    return data
