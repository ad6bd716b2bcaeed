"""The options of ``peft-kernel finetune``: command line, config file, defaults, checks.

Cheap to import (no torch): the CLI builds its parser from here on every invocation, and every
mistake in the options is reported before torch or transformers load.

Precedence: an option given on the command line, else the config file (``--config``), else the
default, and the defaults depend on the model: the embedded tiny model trains fast with a high
learning rate, a real model with the usual LoRA settings.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import attrs

from peft_kernel.plugin_api import CliError, ConfigError, read_settings_file

DEFAULT_OUTPUT = "finetune-output"


@attrs.frozen
class Option:
    """One long option (``--eval-split``), also a key of the config file (``eval_split`` or ``eval-split``)."""

    name: str
    kind: str  # "str" | "int" | "float" | "flag"
    help: str
    default: Any = None
    embedded_default: Any = None
    """The default with the embedded tiny model, when it differs from ``default``."""
    metavar: str | None = None
    check: Callable[[Any], str | None] | None = None
    """Returns what is wrong with a value, or None."""

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    def default_for(self, embedded: bool) -> Any:
        return self.embedded_default if embedded and self.embedded_default is not None else self.default


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _fraction(value: Any) -> str | None:
    return None if 0 <= value < 1 else "must be at least 0 and below 1 (the share of the data held out for evaluation)"


OPTIONS: tuple[Option, ...] = (
    Option("model", "str", "a transformers causal LM: a local folder or a Hub id (offline: from the cache). "
           "Default: the embedded tiny Llama (built in code, no download)", metavar="PATH_OR_HUB_ID"),
    Option("data", "str", "training data: JSONL (or a JSON list) of objects with 'text', or 'prompt' and 'completion' "
           "(loss on the completion only); CSV with those columns; or plain text, one example per line. "
           "Default: the bundled sentiment/topic sentences", metavar="FILE"),
    Option("method", "str", "the PEFT method: any installed method plugin (`peft-kernel list-plugins`)", default="lora",
           metavar="NAME"),
    Option("output", "str", f"output folder: the adapter in HF PEFT's format, metrics.json, loss.png, checkpoints/ "
           f"(default ./{DEFAULT_OUTPUT})", default=DEFAULT_OUTPUT, metavar="DIR"),
    Option("eval-split", "float", "share of the data held out for evaluation (default 0.1; 0: no evaluation)",
           default=0.1, metavar="FRACTION", check=_fraction),
    Option("max-steps", "int", "stop after this many optimizer steps (overrides --epochs)", metavar="N", check=_positive),
    Option("epochs", "float", "passes over the training data (default 1; 12 with the embedded model)", default=1.0,
           embedded_default=12.0, metavar="N", check=_positive),
    Option("lr", "float", "peak learning rate, linear decay (default 2e-4; 5e-3 with the embedded model)", default=2e-4,
           embedded_default=5e-3, check=_positive),
    Option("batch-size", "int", "examples per device and step (default 8; 32 with the embedded model)", default=8,
           embedded_default=32, metavar="N", check=_positive),
    Option("grad-accum", "int", "gradient accumulation steps (default 1)", default=1, metavar="N", check=_positive),
    Option("seed", "int", "seed of the adapter's initialisation, the data split and order (default 0)", default=0),
    Option("threads", "int", "torch CPU threads per process (default: torch's choice; 1 with the embedded model, "
           "which is too small to gain from more)", embedded_default=1, metavar="N", check=_positive),
    Option("max-length", "int", "truncate examples to this many tokens (default 512)", default=512, metavar="N",
           check=_positive),
    Option("eval-steps", "int", "evaluate every N steps (default: about 10 times per run)", metavar="N", check=_positive),
    Option("save-steps", "int", "write a checkpoint every N steps (default: at each evaluation); the last two are kept",
           metavar="N", check=_positive),
    Option("from-adapter", "str", "start from a saved adapter (a folder save_pretrained wrote, or a Hub id) and train it "
           "further; its config fixes the method and fields (QEfficient's from_peft_checkpoint)", metavar="DIR"),
    Option("resume", "str", "resume from a checkpoint folder (adapter, optimizer, scheduler), or from the newest "
           "checkpoint in a folder of checkpoints or an earlier --output", metavar="DIR"),
    Option("fsdp", "flag", "under torchrun: shard the model with FSDP2 (each decoder layer, then the root) instead of "
           "distributed data parallel; checkpoints hold the adapter only (no --resume)",
           default=False),
    Option("no-progress", "flag", "no progress bar", default=False),
    Option("json", "flag", "print metrics.json at the end instead of the summary", default=False),
)
BY_KEY = {o.key: o for o in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options. Every default is None so that the config file can fill what the
    command line leaves out; the real defaults are applied by :func:`resolve`."""
    parser.add_argument("--config", metavar="FILE.yaml|json",
                        help="a YAML or JSON file with any of these options (as 'eval_split' or 'eval-split') and a "
                             "'peft:' section with the method's config fields; the command line wins")
    parser.add_argument("--peft", action="append", default=None, metavar="KEY=VALUE",
                        help="a field of the method's config, e.g. r=16 or target_modules='[\"q_proj\",\"v_proj\"]' "
                             "(JSON values; anything else is a string); repeat for more")
    types = {"str": str, "int": int, "float": float}
    for option in OPTIONS:
        flag = f"--{option.name}"
        if option.kind == "flag":
            parser.add_argument(flag, action="store_const", const=True, default=None, help=option.help)
        else:
            parser.add_argument(flag, type=types[option.kind], default=None, metavar=option.metavar, help=option.help)


@attrs.define
class Settings:
    """Everything the job needs, after the command line, the config file and the defaults."""

    model: str | None
    data: str | None
    method: str
    output: str
    eval_split: float
    max_steps: int | None
    epochs: float
    lr: float
    batch_size: int
    grad_accum: int
    seed: int
    threads: int | None
    max_length: int
    eval_steps: int | None
    save_steps: int | None
    from_adapter: str | None
    resume: str | None
    fsdp: bool
    no_progress: bool
    json: bool
    peft: dict[str, Any] = attrs.field(factory=dict)
    """The method's config fields from the config file's ``peft:`` section and ``--peft``."""
    peft_sources: dict[str, str] = attrs.field(factory=dict)
    """Where each ``peft`` field came from (for errors): ``"--peft"`` or ``"<file>: peft"``."""
    config_file: str | None = None

    @property
    def embedded(self) -> bool:
        return self.model is None


# ---- the config file --------------------------------------------------------------------------
def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a ``.yaml`` / ``.yml`` / ``.json`` file (errors name the file)."""
    try:
        return read_settings_file(path, f"--config {path}")
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _accepted_keys() -> str:
    return ", ".join(sorted([*BY_KEY, "peft"]))


def _coerce(option: Option, value: Any, where: str) -> Any:
    """A config-file value as the option's type (YAML reads 1e-3 as a string, so numbers in strings pass)."""
    kind = option.kind
    if kind == "flag":
        if isinstance(value, bool):
            return value
        raise CliError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
    if kind == "str":
        if isinstance(value, str) and value:
            return value
        raise CliError(f"{where}: expected a non-empty string, got {type(value).__name__} {value!r}")
    wanted = "an integer" if kind == "int" else "a number"
    number: Any = None
    if not isinstance(value, bool):
        if kind == "int":
            if isinstance(value, int):
                number = value
            elif isinstance(value, float) and value.is_integer():
                number = int(value)
            elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                number = int(value)
        elif isinstance(value, (int, float, str)):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and not math.isfinite(number):
                number = None
    if number is None:
        raise CliError(f"{where}: expected {wanted}, got {type(value).__name__} {value!r}")
    return number


def parse_peft_pairs(pairs: list[str]) -> dict[str, Any]:
    """``["r=16", "target_modules=[\"q_proj\"]"]`` -> ``{"r": 16, "target_modules": ["q_proj"]}``."""
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"--peft {pair!r}: expected KEY=VALUE, e.g. --peft r=16")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a plain string: target_modules=all-linear, init_lora_weights=gaussian
        fields[key] = value
    return fields


def resolve(args: argparse.Namespace) -> Settings:
    """Merge the command line, the config file and the defaults; check every value."""
    from_file: dict[str, Any] = {}
    peft: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        raw = read_config_file(config_path)
        for key, value in raw.items():
            norm = str(key).replace("-", "_")
            where = f"{config_path}: {key}"
            if norm == "peft":
                if value is None:
                    continue
                if not isinstance(value, Mapping):
                    raise CliError(f"{where}: expected a mapping of the method's config fields, got {type(value).__name__}")
                peft.update({str(k): v for k, v in value.items()})
                sources.update({str(k): f"{config_path}: peft" for k in value})
            elif norm in BY_KEY:
                from_file[norm] = _coerce(BY_KEY[norm], value, where)
            else:
                raise CliError(f"{where}: unknown option. Accepted keys: {_accepted_keys()}")
    given_pairs = parse_peft_pairs(getattr(args, "peft", None) or [])
    peft.update(given_pairs)
    sources.update({k: "--peft" for k in given_pairs})

    values: dict[str, Any] = {}
    for option in OPTIONS:
        given = getattr(args, option.key, None)
        values[option.key] = given if given is not None else from_file.get(option.key)
    embedded = values["model"] is None
    for option in OPTIONS:
        if values[option.key] is None:
            values[option.key] = option.default_for(embedded)
        value = values[option.key]
        if value is not None and option.check is not None:
            problem = option.check(value)
            if problem:
                raise CliError(f"--{option.name} {value}: {problem}")
    if values["data"] is not None and not Path(values["data"]).is_file():
        raise CliError(f"--data {values['data']}: no such file")
    return Settings(**values, peft=peft, peft_sources=sources, config_file=config_path)


# ---- the method -------------------------------------------------------------------------------
def _normalise(name: str) -> str:
    return name.strip().upper().replace("-", "_")


def find_method(name: str) -> Any:
    """The registry record of ``--method NAME`` (``lora``, ``IA3``, ``prompt-tuning``...)."""
    from peft_kernel.plugin_api import get_registry, install_hint

    methods = get_registry().methods
    key = _normalise(name)
    if key in methods:
        return methods[key]
    installed = ", ".join(sorted(m.lower() for m in methods)) or "none"
    raise CliError(f"--method {name}: no installed plugin provides this method. {install_hint(key)} "
                   f"Installed methods: {installed} (`peft-kernel list-plugins` shows the plugins).")


def config_fields(config_class: type) -> list[str]:
    """The fields a user may set for a method (``peft_type`` is the method's own)."""
    return sorted(f.name for f in attrs.fields(config_class) if f.init and f.name != "peft_type")


def check_peft_fields(record: Any, fields: Mapping[str, Any], source: str) -> None:
    """Every key must be a field of the method's config class; the error lists the accepted ones."""
    accepted = config_fields(record.config_class)
    unknown = [k for k in fields if k not in accepted]
    if unknown:
        raise CliError(
            f"{source}: {record.config_class.__name__} ({record.peft_type.lower()}) has no field "
            f"{', '.join(repr(k) for k in unknown)}. Its fields: {', '.join(accepted)}"
        )
