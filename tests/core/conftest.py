"""Every core test runs on a registry holding only the inline toy method (``core_toy``): installed
plugins are hidden, so these tests pass with no method plugin installed."""

from __future__ import annotations

from typing import Iterator

import core_toy
import pytest

from peft_kernel.plugins import Registry, build_registry, set_registry


@pytest.fixture(autouse=True)
def toy_registry() -> Iterator[Registry]:
    registry = build_registry(entry_points=[], extra_plugins={"toy": core_toy}, disabled=[])
    old = set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(old)
