"""The pytest plugin of peft-kernel-testing, seen from a user's test run: it provides
``isolated_registry`` and leaves the environment (``HF_HUB_OFFLINE``) alone."""

from __future__ import annotations

import os
import subprocess
import sys

USER_TEST = '''
import os

from peft_kernel.plugins import get_registry


def test_environment_untouched():
    assert "HF_HUB_OFFLINE" not in os.environ


def test_isolated_registry(isolated_registry):
    registry = isolated_registry(entry_points=[], disabled=[])
    assert get_registry() is registry and registry.methods == {}
'''


def test_user_run_gets_the_fixture_and_keeps_its_environment(tmp_path):
    (tmp_path / "test_user.py").write_text(USER_TEST)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
