"""The dependency lock (``constraints.txt``): write it, and say which of its pins apply here.

    python tools/lock.py freeze [--output constraints.txt]
        Write the lock from the running environment: every installed distribution at its exact
        version (``pip freeze --all``), except pip, the editable peft-kernel packages and torch with
        its CUDA runtime (torch comes from TORCH_SPEC). The torch it was made with is recorded in
        the header line ``# torch: <version>``.

    python tools/lock.py constraints [constraints.txt] [--output FILE]
        The constraints for this environment, where torch is already installed: the whole lock when
        torch is the version the lock records (local builds such as ``+cpu`` / ``+cu128`` alike);
        otherwise the lock without the packages torch itself requires (sympy, networkx...), so a
        TORCH_SPEC of another release never conflicts with the lock.

    python tools/lock.py lowest [--extra test] [--output FILE]
        Constraints that pin every direct dependency of the repository's packages (pyproject.toml at
        the top and under plugins/ and examples/) to the lower bound its range declares, torch
        excepted: what `nox -s lowest` installs to show that the lower bounds are honest.

Standard library only: it runs in a fresh venv that holds nothing but torch.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_TORCH_LINE = re.compile(r"^#\s*torch:\s*(\S+)")
_NOT_LOCKED = re.compile(r"^(pip|torch|triton|pytorch-triton.*|nvidia-.*|peft-kernel.*)$")
"""pip itself; torch and its CUDA runtime (TORCH_SPEC chooses them); this repository's packages."""

HEADER = """\
# The versions the test suite was verified with: pip constraints (-c), used by `make setup/test/demo/bench`,
# nox's `tests` and `bench` sessions and CI (.ci/run). Not requirements: they pin whatever the
# packages' own ranges pull in. torch is not pinned here: TORCH_SPEC installs it (default torch==2.13.0);
# with another torch release, the packages torch itself requires are left free (tools/lock.py constraints).
# Refresh: `make lock` (a fresh venv with the newest releases), then `make clean test`; see docs/dependencies.md.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


def freeze() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True,
    ).stdout
    pins = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("-e "):
            continue
        match = _NAME.match(line)
        if match is None or "==" not in line:
            raise SystemExit(f"tools/lock.py: cannot lock {line!r} (not name==version; installed from a path or URL?)")
        if _NOT_LOCKED.match(canonical(match.group(1))):
            continue
        pins.append(line)
    pins.sort(key=lambda pin: canonical(_NAME.match(pin).group(1)))
    torch = metadata.version("torch")
    python = ".".join(map(str, sys.version_info[:2]))
    return HEADER + f"# torch: {_base_version(torch)}\n# python: {python}\n" + "\n".join(pins) + "\n"


def constraints(lock_text: str) -> tuple[str, list[str]]:
    """``(constraints, names left free)`` for the torch installed here."""
    locked_torch = next((m.group(1) for m in map(_TORCH_LINE.match, lock_text.splitlines()) if m), None)
    try:
        torch = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return lock_text, []
    if locked_torch is not None and _base_version(torch.version) == _base_version(locked_torch):
        return lock_text, []
    torch_needs = {canonical(m.group(1)) for m in map(_NAME.match, torch.requires or []) if m}
    kept, freed = [], []
    for line in lock_text.splitlines():
        match = _NAME.match(line)
        if match and not line.lstrip().startswith("#") and canonical(match.group(1)) in torch_needs:
            freed.append(canonical(match.group(1)))
            continue
        kept.append(line)
    return "\n".join(kept) + "\n", freed


_LOWER = re.compile(r">=\s*([0-9][^,;\s]*)")


def lowest(extras: list[str], root: str = ".") -> str:
    """``name==lower bound`` for every direct dependency with one (torch and our packages aside)."""
    import glob
    import os

    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        raise SystemExit("tools/lock.py lowest needs Python 3.11+ (tomllib)") from None
    files = [os.path.join(root, "pyproject.toml")] + sorted(
        glob.glob(os.path.join(root, "plugins", "*", "pyproject.toml")) + glob.glob(os.path.join(root, "examples", "*", "pyproject.toml")))
    bounds: dict[str, str] = {}
    for path in files:
        with open(path, "rb") as handle:
            project = tomllib.load(handle).get("project", {})
        requirements = list(project.get("dependencies", []))
        for extra in extras:
            requirements += project.get("optional-dependencies", {}).get(extra, [])
        for requirement in requirements:
            name = canonical(_NAME.match(requirement).group(1))
            lower = _LOWER.search(requirement.split(";", 1)[0])
            if lower is None or _NOT_LOCKED.match(name):
                continue
            bounds[name] = max(bounds.get(name, lower.group(1)), lower.group(1), key=_version_key)
    return "".join(f"{name}=={bounds[name]}\n" for name in sorted(bounds))


def _version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.+-]", version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/lock.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_freeze = sub.add_parser("freeze", help="write the lock from this environment")
    p_freeze.add_argument("--output", "-o", default="-")
    p_cons = sub.add_parser("constraints", help="the lock's pins that apply with the torch installed here")
    p_cons.add_argument("lock", nargs="?", default="constraints.txt")
    p_cons.add_argument("--output", "-o", default="-")
    p_low = sub.add_parser("lowest", help="pin every direct dependency to its declared lower bound")
    p_low.add_argument("--extra", action="append", default=[])
    p_low.add_argument("--output", "-o", default="-")
    args = parser.parse_args(argv)
    if args.command == "freeze":
        text = freeze()
    elif args.command == "lowest":
        text = lowest(args.extra)
    else:
        with open(args.lock, encoding="utf-8") as handle:
            text, freed = constraints(handle.read())
        if freed:
            print(f"tools/lock.py: torch {metadata.version('torch')} is not the locked release; leaving "
                  f"{', '.join(sorted(freed))} to torch's own requirements.", file=sys.stderr)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
