"""pytest plugin (entry point ``pytest11``): a fixture for isolated plugin registries.

It leaves the environment alone: users' test runs keep their own Hub settings (peft-kernel's own
suite runs offline through its root ``conftest.py``, ``make test`` and nox)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest


@pytest.fixture
def isolated_registry() -> Iterator[Callable[..., Any]]:
    """Build a fresh registry (``build_registry`` kwargs) and make it the process-wide one for the test."""
    from peft_kernel.plugin_api import build_registry, set_registry

    old = set_registry(None)

    def make(**kwargs: Any) -> Any:
        registry = build_registry(**kwargs)
        set_registry(registry)
        return registry

    try:
        yield make
    finally:
        set_registry(old)
