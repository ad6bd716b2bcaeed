"""nox sessions: `nox -s tests` (the suite), `nox -s bench` (benchmarks vs HF PEFT)."""

import glob
import os

import nox

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
PACKAGES = sorted(os.path.dirname(p) for p in glob.glob("plugins/*/pyproject.toml") + glob.glob("examples/*/pyproject.toml"))


def _install(session: nox.Session, extra: str) -> None:
    session.install(TORCH_SPEC)
    session.install("-e", f".[{extra}]", *[arg for p in PACKAGES for arg in ("-e", p)])


@nox.session
def tests(session: nox.Session) -> None:
    _install(session, "test")
    session.run("python", "-m", "pytest", "-n", "2", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    _install(session, "bench")
    session.run("python", "-m", "benchmarks", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
