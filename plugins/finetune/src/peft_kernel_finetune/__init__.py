"""peft-kernel-finetune: ``peft-kernel finetune``, a method-agnostic training job on transformers'
Trainer (``peft_kernel_finetune.trainer``), on one process or under torchrun.

Python API: :func:`peft_kernel_finetune.job.finetune` takes the command's options as keywords.
"""

__all__ = ["finetune"]


def finetune(**options):  # noqa: ANN001, ANN201 - a thin lazy wrapper
    """Run ``peft-kernel finetune`` from Python (keywords as the long options, ``eval_split=0.2``);
    returns the metrics dict also written to ``metrics.json``."""
    from peft_kernel_finetune.job import finetune as _finetune

    return _finetune(**options)
