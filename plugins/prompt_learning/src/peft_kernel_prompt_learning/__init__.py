"""The prompt-learning family of peft-kernel: what prompt tuning, prefix tuning and the coming
virtual-token methods share.

A family library and an entry-point plugin that registers no method: it adds the
``peft_kernel_create_prompt_encoder`` hook (:mod:`peft_kernel_prompt_learning.hookspecs`) and
returns its :class:`~peft_kernel_prompt_learning.learner.PromptLearner` as the adapter host of
methods with the ``prompt_learning`` capability (:mod:`peft_kernel_prompt_learning.plugin`). The
mechanism is described in :mod:`peft_kernel_prompt_learning.config`; torch-heavy code lives in
:mod:`peft_kernel_prompt_learning.learner`, imported when a model is built.
"""

from peft_kernel_prompt_learning.config import INJECTIONS, SAVED_KEY, PromptLearningConfig

__all__ = ["INJECTIONS", "SAVED_KEY", "PromptLearningConfig", "FAMILY_EXPORTS"]

FAMILY_EXPORTS = {"PromptLearningConfig": "peft_kernel_prompt_learning.config:PromptLearningConfig"}
"""Public names of HF PEFT that belong to the family: every prompt-learning method's record adds
them to its ``exports``, so ``peft_kernel.PromptLearningConfig`` resolves while one is installed."""
