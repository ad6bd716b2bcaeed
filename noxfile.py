"""nox sessions: `nox -s tests` (the suite at the locked versions), `nox -s latest` (the suite at the
newest releases, no lock: the next break shows here first), `nox -s lowest` (every dependency at its
declared lower bound), `nox -s bench` (benchmarks vs HF PEFT), `nox -s core` (the core's own tests
with no plugin installed: core + peft-kernel-testing only), `nox -s "plugin(name='ia3')"` (one
package of plugins/ or examples/ installed alone, with only what its pyproject asks for, running its
own tests; `nox -s plugin` runs every one). docs/dependencies.md explains the lock.

TORCH_SPEC (default torch==2.13.0) is one requirement, optionally followed by pip options, e.g.
TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128". `latest` keeps that
torch too (torch builds are machine-specific); TORCH_SPEC=torch makes it take the newest torch as well.
"""

import glob
import os
import re
import shlex
import tomllib

import nox

TORCH_SPEC = shlex.split(os.environ.get("TORCH_SPEC", "torch==2.13.0"))
LOCK = "constraints.txt"
# plugins/_template is a skeleton to copy, not a plugin to install (it would register a TEMPLATE method)
PACKAGES = sorted(os.path.dirname(p) for p in glob.glob("plugins/[!_]*/pyproject.toml") + glob.glob("examples/*/pyproject.toml"))
EDITABLES = [arg for p in PACKAGES for arg in ("-e", p)]
PYTEST = ("python", "-m", "pytest", "-n", "2", "-q")
OFFLINE = {"HF_HUB_OFFLINE": "1"}
nox.options.sessions = ["tests"]  # a bare `nox` runs the suite as CI does; the others are asked for by name


def _project(folder: str) -> dict:
    with open(os.path.join(folder, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)["project"]


def _canonical(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


LOCAL = {_canonical(_project(folder)["name"]): folder for folder in PACKAGES}
"""``{distribution: folder}`` of this repository's packages: pip takes them from here, not an index."""
TESTED = {os.path.basename(folder): folder for folder in PACKAGES if os.path.isdir(os.path.join(folder, "tests"))}


def _alone(folder: str) -> list[str]:
    """pip arguments for ``folder`` (with its ``test`` extra, if it declares one), peft-kernel-testing
    and every package of this repository they need, found through the requirements of its pyproject
    (runtime and ``test``), theirs, and so on: family libraries, or the method a backend's tests use.
    Nothing else."""
    extras = _project(folder).get("optional-dependencies", {})
    wanted, todo = [], [folder, LOCAL["peft-kernel-testing"]]
    while todo:
        current = todo.pop(0)
        if current in wanted:
            continue
        wanted.append(current)
        requirements = _project(current).get("dependencies", []) + (extras.get("test", []) if current == folder else [])
        todo += [LOCAL[name] for name in map(_canonical, requirements) if name in LOCAL]
    first = f"{folder}[test]" if "test" in extras else folder
    return [arg for p in [first, *wanted[1:]] for arg in ("-e", p)]


def _install_locked(session: nox.Session, core: str, packages: list[str]) -> None:
    """As `make setup`: torch first without its dependencies, then the lock's pins that apply to that
    torch (tools/lock.py), then ``core`` (``.`` with extras) and ``packages`` (pip arguments) under them."""
    session.install("--no-deps", *TORCH_SPEC)
    constraints = os.path.join(session.virtualenv.location, "constraints.txt")
    session.run("python", "tools/lock.py", "constraints", LOCK, "--output", constraints)
    session.install("-c", constraints, "setuptools>=77", "torch")  # torch's own dependencies, under the lock
    session.install("-c", constraints, "--no-build-isolation", "-e", core, *packages)
    session.run("python", "-m", "pip", "check")


@nox.session
def tests(session: nox.Session) -> None:
    """ruff, then the suite at the locked versions (constraints.txt), as `make test` and CI run them."""
    _install_locked(session, ".[test]", EDITABLES)
    session.run("ruff", "check", ".")
    session.run(*PYTEST, *session.posargs, env=OFFLINE)


@nox.session
def core(session: nox.Session) -> None:
    """The core's tests (tests/core) with no plugin installed: core + peft-kernel-testing, locked.

    The tests register an inline toy method in-process, so a kernel bug cannot hide behind LoRA."""
    _install_locked(session, ".", ["-e", LOCAL["peft-kernel-testing"]])
    session.run("python", "-m", "pytest", "-q", "tests/core", *session.posargs, env=OFFLINE)


@nox.session
@nox.parametrize("name", sorted(TESTED))
def plugin(session: nox.Session, name: str) -> None:
    """One package's own tests with that package installed alone (plus what it requires), locked.

    Installs the core with its test extra (peft-kernel-testing, pytest, HF peft as the oracle), the
    package and only the packages of this repository its pyproject requires (runtime and ``test``
    extra). Proves each plugin installs and passes on its own."""
    folder = TESTED[name]
    _install_locked(session, ".[test]", _alone(folder))
    session.run(*PYTEST, os.path.join(folder, "tests"), *session.posargs, env=OFFLINE)


@nox.session
def latest(session: nox.Session) -> None:
    """The suite at the newest releases the ranges allow, no lock (torch from TORCH_SPEC)."""
    session.install(*TORCH_SPEC)
    hold_torch = os.path.join(session.virtualenv.location, "torch-only.txt")  # eager upgrades leave torch be
    session.run("python", "-c", f"import torch; open({hold_torch!r}, 'w').write('torch==' + torch.__version__)")
    session.install("-c", hold_torch, "--upgrade", "setuptools>=77")
    session.install("-c", hold_torch, "--upgrade", "--upgrade-strategy", "eager", "--no-build-isolation",
                    "-e", ".[test]", *EDITABLES)
    session.run("python", "-m", "pip", "check")
    session.run("python", "-m", "pip", "freeze", "--exclude-editable")  # the versions this run tested
    session.run(*PYTEST, "-rxX", *session.posargs, env=OFFLINE)


@nox.session
def lowest(session: nox.Session) -> None:
    """Every direct dependency at the lower bound its range declares (torch from TORCH_SPEC)."""
    session.install("--no-deps", *TORCH_SPEC)
    floor = os.path.join(session.virtualenv.location, "lowest.txt")
    session.run("python", "tools/lock.py", "lowest", "--extra", "test", "--output", floor)
    session.install("-c", floor, "setuptools>=77", "torch")
    session.install("-c", floor, "--no-build-isolation", "-e", ".[test]", *EDITABLES)
    session.run("python", "-m", "pip", "check")
    session.run("python", "-m", "pip", "freeze", "--exclude-editable")
    session.run(*PYTEST, "-rxX", *session.posargs, env=OFFLINE)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against HF PEFT, at the locked versions."""
    _install_locked(session, ".[bench]", EDITABLES)
    session.run("python", "-m", "benchmarks", *session.posargs, env=OFFLINE)
