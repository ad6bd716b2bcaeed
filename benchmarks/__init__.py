"""peft-kernel benchmarks: the base model, HF ``peft`` and peft-kernel side by side in one process.

Run ``python -m benchmarks`` (or ``nox -s bench`` / ``make bench``); ``--quick`` for a smoke run.
See ``docs/performance.md`` for what is measured and the latest table.
"""
