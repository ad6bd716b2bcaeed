"""``peft-kernel``: the command line.

``list-plugins``  what is installed: each plugin's distribution, version, what it provides and
                  whether it loaded (a broken plugin is listed as failed with its error; one whose
                  hook raised at run time in this process as failing).
``inspect PATH``  what a saved adapter folder holds: method, non-default config fields, targeted
                  modules, parameter count, files and sizes (sub-folder adapters included).
Plugins add further commands through the ``peft_kernel_register_commands`` hook
(``peft-kernel-demo`` adds ``demo``, ``peft-kernel-finetune`` adds ``finetune``); a plugin that fails
there is reported, never fatal.

Human-readable output by default, ``--json`` for machines. Bad input ends with a one-line
``peft-kernel: error: ...`` on stderr and exit status 1, never a traceback; output piped into a
reader that stops early (``| head``) ends quietly with status 141, as Unix tools do. This module imports
nothing heavy at import time; ``torch`` is loaded only by the commands that need it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import attrs

PROG = "peft-kernel"


class CliError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


# ---- output helpers -------------------------------------------------------------------------
def render_table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> list[str]:
    """A plain-text table with a rule under the header; columns in ``right`` are right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])]


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


# ---- list-plugins -----------------------------------------------------------------------------
def cmd_list_plugins(args: argparse.Namespace) -> int:
    import attrs

    from peft_kernel.plugins import DISABLE_ENV, get_registry

    statuses = get_registry().plugins
    if args.json:
        _print_json([attrs.asdict(s) for s in statuses])
        return 0
    rows = []
    for s in statuses:
        provides = ", ".join([*s.methods, *(f"backend:{b}" for b in s.backends)])
        if not provides:  # a command, a family library, the core: say what it hooks into
            hooks = [h for h in s.hooks if h not in ("register_methods", "register_backends")]
            provides = f"hooks: {', '.join(hooks)}" if hooks else "-"
        rows.append((s.name, s.distribution, s.version or "-", provides, s.status))
    print("\n".join(render_table(("plugin", "distribution", "version", "provides", "status"), rows)))
    problems = [s for s in statuses if s.status != "loaded"]
    if problems:
        print()
    for s in problems:
        if s.status in ("failed", "failing"):
            print(f"{s.name}: {s.status}: {s.error}")
        else:
            print(f"{s.name}: blocked by {DISABLE_ENV}")
    return 0


# ---- inspect ----------------------------------------------------------------------------------
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HIDDEN_CONFIG_FIELDS = ("peft_type", "task_type", "base_model_name_or_path", "peft_version", "revision", "inference_mode")
"""Shown on their own lines, or always the same in a saved adapter (``inference_mode``)."""


def _adapter_locations(path: str) -> list[tuple[str, str, str | None]]:
    """``(adapter name, model id or folder, subfolder)`` for every adapter under ``path``."""
    from peft_kernel.checkpoint import CONFIG_NAME

    local = Path(path)
    if local.is_file():
        local = local.parent  # a file inside an adapter folder: inspect the folder
    if local.is_dir():
        found = []
        if (local / CONFIG_NAME).is_file():
            found.append(("default", str(local), None))
        for sub in sorted(p for p in local.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()):
            found.append((sub.name, str(local), sub.name))
        if not found:
            raise CliError(
                f"{path}: no adapter here: no {CONFIG_NAME} in the folder or in its sub-folders. "
                "Pass the folder that save_pretrained wrote."
            )
        return found
    if _REPO_ID.match(path) and not path.startswith("."):
        return [("default", path, None)]  # a Hub repo id (the offline cache works too)
    raise CliError(f"{path}: no such file or folder")


def _load_config(model_id: str, subfolder: str | None) -> tuple[Any, dict[str, Any], list[str]]:
    """The config object (or None when no installed plugin provides its method), its raw JSON
    and any notes (dropped unknown keys, missing plugin)."""
    from peft_kernel.checkpoint import resolve_file
    from peft_kernel.checkpoint import CONFIG_NAME
    from peft_kernel.config import PeftConfig
    from peft_kernel.errors import UnknownMethodError

    raw = PeftConfig.from_json_file(resolve_file(model_id, CONFIG_NAME, subfolder=subfolder))
    if not isinstance(raw, dict):
        raise CliError(f"{CONFIG_NAME} of {model_id} holds a JSON {type(raw).__name__}, not an object")
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder)
        except UnknownMethodError as exc:
            config = None
            notes.append(str(exc))
    notes.extend(str(w.message) for w in caught)
    return config, raw, notes


def _config_summary(config: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """Fields whose value differs from the method's default (all of them if that is unknown)."""
    if config is None:  # no plugin to know the defaults: show what was saved, minus empty fields
        return {k: v for k, v in sorted(raw.items()) if k not in _HIDDEN_CONFIG_FIELDS and v is not None}
    values = config.to_dict()
    # a field without a usable default names a valid value in its metadata ({"example": ...}); it is
    # always shown
    required = {f.name: f.metadata["example"] for f in attrs.fields(type(config)) if "example" in f.metadata}
    defaults: dict[str, Any] = {}
    try:
        defaults = type(config)(**required).to_dict()
    except Exception:  # a config class whose defaults do not validate on their own
        defaults = {}
    return {
        k: v for k, v in sorted(values.items())
        if k not in _HIDDEN_CONFIG_FIELDS and (k not in defaults or k in required or defaults[k] != v)
    }


def _module_of(key: str, prefix: str) -> tuple[str, bool]:
    """The module a tensor key belongs to, and whether it is an adapter tensor (else a tensor
    saved in full, such as ``modules_to_save`` or a bias)."""
    parts = key.split(".")
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    for i, part in enumerate(parts):
        if part.startswith(prefix):
            return ".".join(parts[:i]), True
    return ".".join(parts[:-1]), False


def _collapse(modules: Sequence[str]) -> list[tuple[str, int]]:
    """``model.layers.0.q_proj``, ``model.layers.1.q_proj`` -> ``("model.layers.*.q_proj", 2)``;
    a pattern that stands for one module is shown by its real name."""
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name), []).append(name)
    return sorted((names[0] if len(names) == 1 else pattern, len(names)) for pattern, names in groups.items())


def inspect_adapter(name: str, model_id: str, subfolder: str | None) -> dict[str, Any]:
    """Everything ``inspect`` reports about one adapter, as a JSON-ready dict."""
    from peft_kernel.checkpoint import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter_weights, resolve_file
    from peft_kernel.plugins import get_registry

    config, raw, notes = _load_config(model_id, subfolder)
    peft_type = str(getattr(config, "peft_type", None) and getattr(config.peft_type, "value", config.peft_type)
                    or raw.get("peft_type", "?"))
    registry = get_registry()
    record = registry.methods.get(peft_type.upper())
    prefix = record.prefix if record is not None else f"{peft_type.lower()}_"
    tensors = load_adapter_weights(model_id, subfolder=subfolder)

    found = [_module_of(key, prefix) for key in tensors]
    adapted = sorted({module for module, is_adapter in found if is_adapter})
    # a tensor directly under an adapted module is the adapter's too, even when the record's prefix
    # marks only some of its containers (AdaLoRA's "lora_E" beside lora_A / lora_B)
    full = sorted({module for module, is_adapter in found if not is_adapter and module not in adapted})
    dtypes: dict[str, int] = {}
    for tensor in tensors.values():
        dtype = str(tensor.dtype).removeprefix("torch.")
        dtypes[dtype] = dtypes.get(dtype, 0) + tensor.numel()

    folder = Path(model_id) / (subfolder or "")
    if folder.is_dir():
        files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    else:  # a Hub repo: the files we resolved
        files = {}
        for file in ("adapter_config.json", WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            found = resolve_file(model_id, file, subfolder=subfolder, missing_ok=True)
            if found is not None:
                files[file] = found.stat().st_size
    task_type = raw.get("task_type")
    return {
        "adapter": name,
        "path": str(folder.resolve()) if folder.is_dir() else f"{model_id}{'/' + subfolder if subfolder else ''}",
        "peft_type": peft_type,
        "plugin": record.distribution if record is not None else None,
        "task_type": task_type,
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "config": _config_summary(config, raw),
        "config_defaults_known": config is not None,
        "targeted_modules": adapted,
        "full_modules": full,
        "parameters": sum(t.numel() for t in tensors.values()),
        "parameters_by_dtype": dtypes,
        "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
        "files": files,
        "size_on_disk": sum(files.values()),
        "notes": notes,
    }


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _format_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return repr(value) if isinstance(value, str) else str(value)


def format_inspection(info: dict[str, Any], show_tensors: bool = False) -> list[str]:
    out = [f"adapter {info['adapter']!r}  ({info['path']})"]

    def field(label: str, value: Any) -> None:
        out.append(f"  {label + ':':<18}{value}")

    plugin = f"  (plugin {info['plugin']})" if info["plugin"] else "  (no installed plugin provides it)"
    field("method", info["peft_type"] + plugin)
    field("task type", info["task_type"] or "-")
    field("base model", info["base_model_name_or_path"] or "-")
    if info["config"]:
        out.append("  config (non-default fields):" if info["config_defaults_known"]
                   else "  config (as saved; the defaults are unknown without the plugin):")
        width = max(len(k) for k in info["config"])
        out.extend(f"    {k:<{width}}  {_format_value(v)}" for k, v in info["config"].items())
    else:
        field("config", "all fields at their defaults")
    leaves = sorted({m.rsplit(".", 1)[-1] for m in info["targeted_modules"]})
    field("targeted modules", f"{len(info['targeted_modules'])} ({', '.join(leaves) or 'none'})")
    collapsed = _collapse(info["targeted_modules"])
    width = max((len(p) for p, _ in collapsed), default=0)
    for pattern, count in collapsed:
        out.append(f"    {pattern:<{width}}  x{count}".rstrip() if count > 1 else f"    {pattern}")
    if info["full_modules"]:
        field("saved in full", ", ".join(info["full_modules"]))
    by_dtype = ", ".join(f"{n:,} {d}" for d, n in info["parameters_by_dtype"].items())
    field("parameters", f"{info['parameters']:,} in {_plural(len(info['tensors']), 'tensor')} ({by_dtype or 'none'})")
    files = ", ".join(f"{k} {human_size(v)}" for k, v in info["files"].items())
    field("size on disk", f"{human_size(info['size_on_disk'])}  ({files})")
    if show_tensors:
        out.append("  tensors:")
        width = max((len(k) for k in info["tensors"]), default=0)
        out.extend(f"    {k:<{width}}  {tuple(v)}" for k, v in info["tensors"].items())
    for note in info["notes"]:
        out.append(f"  note: {note}")
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    reports = [inspect_adapter(*where) for where in _adapter_locations(args.path)]
    if args.json:
        _print_json(reports if len(reports) > 1 else reports[0])
        return 0
    blocks = [format_inspection(r, args.tensors) for r in reports]
    print("\n\n".join("\n".join(b) for b in blocks))
    return 0


# ---- plugin commands --------------------------------------------------------------------------
class PluginSubparsers:
    """What ``peft_kernel_register_commands`` receives: argparse's sub-parser action, except that
    a command name (or alias) already taken raises ``ValueError`` instead of replacing the other
    command (Python 3.10's argparse) or failing the whole CLI (3.11+)."""

    def __init__(self, action: Any, core: Sequence[str]) -> None:
        self._action = action
        self._core = set(core)

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        for wanted in (name, *kwargs.get("aliases", ())):
            if wanted in self._action.choices:
                owner = "the core" if wanted in self._core else "another plugin"
                raise ValueError(f"command {wanted!r} is already taken by {owner}; choose another name")
        return self._action.add_parser(name, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._action, name)


def add_plugin_commands(sub: Any, registry: Any = None) -> None:
    """Let every plugin add its sub-commands (``peft_kernel_register_commands``)."""
    from peft_kernel.plugins import get_registry

    registry = registry if registry is not None else get_registry()
    registry.register_commands(PluginSubparsers(sub, list(sub.choices)))


# ---- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from peft_kernel import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="peft-kernel: parameter-efficient fine-tuning as plugins.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("list-plugins", help="installed plugins, what they provide and whether they loaded")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_list_plugins)

    p = sub.add_parser("inspect", help="what a saved adapter folder holds")
    p.add_argument("path", help="a folder written by save_pretrained (HF PEFT or peft-kernel), or a Hub repo id")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--tensors", action="store_true", help="also list every tensor with its shape")
    p.set_defaults(func=cmd_inspect)

    add_plugin_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script passes it to ``sys.exit``)."""
    args = build_parser().parse_args(argv)
    from peft_kernel.errors import PeftKernelError

    try:
        func = getattr(args, "func", None)
        if func is None:  # a plugin's command that set no handler
            raise CliError(f"the command {args.command!r} has no handler (its plugin called no set_defaults(func=...))")
        status = func(args)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return 0 if status is None else status
    except BrokenPipeError:
        # the reader went away (`peft-kernel inspect DIR | head`): stop quietly, as Unix tools do,
        # and keep Python from reporting the pipe again when it flushes stdout at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured)
            pass
        return 128 + 13  # 141: what a shell reports for a command ended by SIGPIPE
    except (CliError, PeftKernelError, OSError) as exc:
        message = str(exc) if not isinstance(exc, OSError) else f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
