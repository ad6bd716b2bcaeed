"""``PeftConfig``: the attrs base of every method's config, and ``adapter_config.json`` I/O.

One strict cattrs converter structures every config: ``r="8"`` is an error, not a silent cast.
Errors carry the JSON path and the expected type (``$.r: expected int, got str '8'``). Keys that
newer HF PEFT versions write and this config does not know are dropped with a warning naming them.
"""

from __future__ import annotations

import enum
import json
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import attrs
import cattrs

from peft_kernel.enums import PeftType, TaskType
from peft_kernel.errors import ConfigError

CONFIG_NAME = "adapter_config.json"
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
    return _Mismatch(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


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
            for member in members:
                if member is _NONE:
                    continue
                try:
                    return conv.structure(value, member)
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


def _format(exc: BaseException, tp: Any) -> str:
    if isinstance(exc, _Mismatch):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required field missing"
    return f"{type(exc).__name__}: {exc}" + (f" (expected {_type_name(tp)})" if tp is not None else "")


def _config_field_names(cls: type) -> set[str]:
    return {f.name for f in attrs.fields(cls) if f.init}


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
        """A JSON-ready dict with HF PEFT's keys (enums as their string values)."""
        raw = converter.unstructure(self)
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

            target = get_registry().method(data["peft_type"]).config_class
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
            problems = cattrs.transform_error(exc, path="$", format_exception=_format)
            raise ConfigError(
                f"{where}invalid {target.__name__}: " + "; ".join(_path_first(p) for p in problems)
            ) from None

    @classmethod
    def _declares_peft_type(cls) -> bool:
        return attrs.fields_dict(cls)["peft_type"].default is not None

    @classmethod
    def from_json_file(cls, path: str | Path) -> dict[str, Any]:
        """Read a config file and return its dict (as HF PEFT's ``from_json_file``)."""
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Load a config from a local folder or a Hub repo id (offline from the cache works)."""
        from peft_kernel.checkpoint import resolve_file

        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        data = cls.from_json_file(path)
        data.update(kwargs)
        return cls.from_dict(data, source=str(path))

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` (sorted keys, as HF PEFT) atomically into ``save_directory``."""
        from peft_kernel.checkpoint import atomic_write_text

        data = self.to_dict()
        data.update(kwargs)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(save_directory) / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True))

    def copy(self) -> PeftConfig:
        return attrs.evolve(self)


def _path_first(problem: str) -> str:
    """cattrs writes 'message @ $.path'; we lead with the path."""
    message, _, path = problem.rpartition(" @ ")
    return f"{path}: {message}" if message else problem


def fields_of(config: PeftConfig) -> set[str]:
    return _config_field_names(type(config))
