"""nox sessions: `nox -s tests` (the suite at the locked versions), `nox -s latest` (the suite at the
newest releases, no lock: the next break shows here first), `nox -s lowest` (every dependency at its
declared lower bound), `nox -s bench` (benchmarks vs HF PEFT). docs/dependencies.md explains the lock.

TORCH_SPEC (default torch==2.13.0) is one requirement, optionally followed by pip options, e.g.
TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128". `latest` keeps that
torch too (torch builds are machine-specific); TORCH_SPEC=torch makes it take the newest torch as well.
"""

import glob
import os
import shlex

import nox

TORCH_SPEC = shlex.split(os.environ.get("TORCH_SPEC", "torch==2.13.0"))
LOCK = "constraints.txt"
# plugins/_template is a skeleton to copy, not a plugin to install (it would register a TEMPLATE method)
PACKAGES = sorted(os.path.dirname(p) for p in glob.glob("plugins/[!_]*/pyproject.toml") + glob.glob("examples/*/pyproject.toml"))
EDITABLES = [arg for p in PACKAGES for arg in ("-e", p)]
PYTEST = ("python", "-m", "pytest", "-n", "2", "-q")
nox.options.sessions = ["tests"]  # a bare `nox` runs the suite as CI does; the others are asked for by name


def _install_locked(session: nox.Session, extra: str) -> None:
    """As `make setup`: torch first without its dependencies, then the lock's pins that apply to that
    torch (tools/lock.py), then everything else under them."""
    session.install("--no-deps", *TORCH_SPEC)
    constraints = os.path.join(session.virtualenv.location, "constraints.txt")
    session.run("python", "tools/lock.py", "constraints", LOCK, "--output", constraints)
    session.install("-c", constraints, "setuptools>=77", "torch")  # torch's own dependencies, under the lock
    session.install("-c", constraints, "--no-build-isolation", "-e", f".[{extra}]", *EDITABLES)
    session.run("python", "-m", "pip", "check")


@nox.session
def tests(session: nox.Session) -> None:
    """The suite at the locked versions (constraints.txt), as `make test` and CI run it."""
    _install_locked(session, "test")
    session.run(*PYTEST, *session.posargs, env={"HF_HUB_OFFLINE": "1"})


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
    session.run(*PYTEST, "-rxX", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


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
    session.run(*PYTEST, "-rxX", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against HF PEFT, at the locked versions."""
    _install_locked(session, "bench")
    session.run("python", "-m", "benchmarks", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
