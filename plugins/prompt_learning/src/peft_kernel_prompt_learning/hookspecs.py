"""The hook the prompt-learning family adds to peft-kernel (through ``peft_kernel_add_hookspecs``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel.plugin_api import hookspec

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from torch import nn

    from peft_kernel_prompt_learning.config import PromptLearningConfig
    from peft_kernel_prompt_learning.learner import PromptEncoder


class PromptLearningSpecs:
    """Hook specifications of the prompt-learning family."""

    @hookspec(firstresult=True)
    def peft_kernel_create_prompt_encoder(
        self, config: PromptLearningConfig, adapter_name: str, model: nn.Module, word_embeddings: nn.Module
    ) -> PromptEncoder | None:
        """Build the prompt encoder of a new adapter of a ``prompt_learning`` method.

        *First result.* Called when an adapter of a method whose record declares the
        ``prompt_learning`` capability is added to a model (``get_peft_model``, ``add_adapter``,
        ``load_adapter``), instead of target matching and layer creation: such methods leave the
        base model's layers alone. ``config`` is a
        :class:`~peft_kernel_prompt_learning.config.PromptLearningConfig` whose model-dependent fields
        (``token_dim``, ``num_layers``, ``num_attention_heads``, ``num_transformer_submodules``) the
        family has already filled from ``model.config``; ``model`` is the base (transformers) model and
        ``word_embeddings`` its input embedding module (for initialising virtual tokens from
        vocabulary embeddings). The hook may fill further method-specific fields of ``config``.

        Return a :class:`~peft_kernel_prompt_learning.learner.PromptEncoder` whose ``forward()`` gives
        the adapter's virtual tokens as ``[num_virtual_tokens * num_transformer_submodules, width]``,
        where ``width`` follows the config class's ``prompt_injection``: ``token_dim`` for
        ``"inputs_embeds"`` (prepended to the input embeddings), ``num_layers * 2 * token_dim`` for
        ``"past_key_values"`` (a key/value prefix per attention layer). The family prepends them per
        batch row (mixed batches included), extends attention masks and labels, saves
        ``saved_prompt()`` as HF PEFT's ``prompt_embeddings`` and loads it back through
        ``load_saved_prompt``. Return ``None`` for configs that are not yours.
        """
