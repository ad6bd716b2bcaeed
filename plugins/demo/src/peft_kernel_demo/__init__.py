"""The ``peft-kernel demo``: two LoRA adapters trained, saved, reloaded and served in one mixed
batch on a tiny Llama built from a config (no download). See :mod:`peft_kernel_demo.run`."""

from __future__ import annotations

from typing import Any


def run_demo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run the demo; see :func:`peft_kernel_demo.run.run_demo`."""
    from peft_kernel_demo.run import run_demo as run

    return run(*args, **kwargs)
