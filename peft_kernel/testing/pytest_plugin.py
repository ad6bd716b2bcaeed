"""pytest plugin (entry point ``pytest11``): offline Hub and a fixture for isolated plugin registries."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest


def pytest_configure(config: Any) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def isolated_registry() -> Iterator[Callable[..., Any]]:
    """Build a fresh registry (``build_registry`` kwargs) and make it the process-wide one for the test."""
    from peft_kernel.plugins import build_registry, set_registry

    old = set_registry(None)

    def make(**kwargs: Any) -> Any:
        registry = build_registry(**kwargs)
        set_registry(registry)
        return registry

    try:
        yield make
    finally:
        set_registry(old)
