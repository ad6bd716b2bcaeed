"""Fixtures of the qaic tests (helpers live in qaic_testing.py, a name no other test folder uses)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PEFT_KERNEL_QAIC_CACHE", tempfile.mkdtemp(prefix="peft-kernel-qaic-tests-"))

import pytest
from qaic_testing import make_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()
