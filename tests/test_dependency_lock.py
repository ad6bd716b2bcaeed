"""constraints.txt (the lock) and tools/lock.py agree with the package metadata."""

from __future__ import annotations

import glob
import importlib.util
import pathlib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).parents[1]


def _lock_tool():
    spec = importlib.util.spec_from_file_location("lock_tool", ROOT / "tools" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[tuple[str, Requirement]]:
    files = [ROOT / "pyproject.toml", *map(pathlib.Path, sorted(glob.glob(str(ROOT / "plugins/*/pyproject.toml"))
                                                                 + glob.glob(str(ROOT / "examples/*/pyproject.toml"))))]
    out = []
    for path in files:
        project = tomllib.loads(path.read_text())["project"]
        for text in project.get("dependencies", []) + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]:
            out.append((str(path.relative_to(ROOT)), Requirement(text)))
    return out


def test_the_lock_pins_exact_versions_and_leaves_torch_to_torch_spec():
    pins = _pins()
    assert "torch" not in pins and "pip" not in pins
    assert not [name for name in pins if name.startswith(("nvidia-", "peft-kernel"))]
    header = (ROOT / "constraints.txt").read_text()
    assert "# torch: " in header and "make lock" in header


def test_every_locked_dependency_is_inside_the_declared_range():
    pins = _pins()
    for where, requirement in _requirements():
        name = canonicalize_name(requirement.name)
        if name.startswith("peft-kernel") or name == "torch":
            continue
        assert name in pins, f"{where}: {requirement} is not in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{where}: {requirement} excludes the locked {name}=={pins[name]}")


def test_constraints_keep_the_whole_lock_for_the_locked_torch_and_free_torch_requirements_otherwise(monkeypatch):
    lock = _lock_tool()
    text = "# torch: 2.13.0\nsympy==1.14.0\nnetworkx==3.6.1\ntransformers==5.24.0\n"

    class FakeTorch:
        requires = ["sympy>=1.13.3", "networkx>=2.5.1", "filelock"]

        def __init__(self, version):
            self.version = version

    for version in ("2.13.0+cpu", "2.13.0+cu128", "2.13.0"):
        monkeypatch.setattr(lock.metadata, "distribution", lambda name, v=version: FakeTorch(v))
        assert lock.constraints(text) == (text, [])
    monkeypatch.setattr(lock.metadata, "distribution", lambda name: FakeTorch("2.6.0"))
    kept, freed = lock.constraints(text)
    assert kept.splitlines() == ["# torch: 2.13.0", "transformers==5.24.0"] and sorted(freed) == ["networkx", "sympy"]


def test_lowest_pins_each_direct_dependency_to_its_declared_lower_bound():
    floor = dict(line.split("==") for line in _lock_tool().lowest(["test"], str(ROOT)).splitlines())
    declared = {canonicalize_name(r.name): r for _, r in _requirements()}
    assert "torch" not in floor and not [n for n in floor if n.startswith("peft-kernel")]
    for name, version in floor.items():
        assert declared[name].specifier.contains(version), (name, version)
    assert floor["transformers"] == str(min(s.version for s in declared["transformers"].specifier if s.operator == ">="))


@pytest.mark.parametrize("target", ["setup", "test", "demo", "bench"])
def test_make_installs_under_the_lock(target):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    commands = subprocess.run(["make", "-n", "-B", target, "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    installs = [line for line in commands.splitlines() if " -m pip install" in line]
    assert installs and all("--no-deps" in line or "-c /nonexistent-venv/constraints.txt" in line for line in installs), installs
    assert "tools/lock.py constraints constraints.txt" in commands
