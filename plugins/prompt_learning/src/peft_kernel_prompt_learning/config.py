"""Prompt learning: methods that add *virtual tokens* instead of wrapping layers.

A prompt-learning method (its record declares the ``prompt_learning`` capability and its config
subclasses :class:`PromptLearningConfig`) leaves the base model untouched. Per adapter it owns one
small module, a :class:`~peft_kernel_prompt_learning.learner.PromptEncoder`, that produces a
``[num_virtual_tokens, width]`` tensor. The config class says, through its ``prompt_injection``
class attribute, how those virtual tokens enter the model, and this family library does the rest
the same way for every method (:class:`~peft_kernel_prompt_learning.learner.PromptLearner`, the
``PeftModel``'s adapter host that :mod:`peft_kernel_prompt_learning.plugin` hands to the core
through ``peft_kernel_create_host``):

``"inputs_embeds"``
    the virtual tokens are prepended to the input embeddings (``width == token_dim``); the
    attention mask gets ``num_virtual_tokens`` ones in front and causal-LM labels ``-100``.
``"past_key_values"``
    the virtual tokens are a key/value prefix in every attention layer
    (``width == num_layers * 2 * token_dim``, laid out ``[layer][key|value][head][head_dim]``),
    handed to the model as a transformers ``Cache``; the attention mask gets the same prefix.

On encoder-decoder models (``model.config.is_encoder_decoder``: T5, BART; ``task_type="SEQ_2_SEQ_LM"``
fills ``num_transformer_submodules=2``) the family does what HF PEFT does: ``"inputs_embeds"`` tokens go
in front of the *encoder's* inputs only (the encoders learn ``2 * num_virtual_tokens`` tokens, of which
HF uses the first half), and a ``"past_key_values"`` prefix goes into the *decoder's* self-attention
only, in HF's layout (``learner.prefix_to_cache``), with ones in front of ``decoder_attention_mask``.
Labels and decoder inputs are left alone; ``generate`` decodes as the base model does. An encoder that
sets ``PromptEncoder.prompts_decoder`` also has its second ``num_virtual_tokens`` put in front of the
decoder's input embeddings (forward and generate; ``-100`` in front of the labels, ones in front of
``decoder_attention_mask``), as HF PEFT does for some methods.

The method plugin supplies the encoder through the ``peft_kernel_create_prompt_encoder`` hook (the
family adds its spec, :mod:`peft_kernel_prompt_learning.hookspecs`). Because the learner builds the
virtual tokens of every batch row from that row's adapter, mixed batches (``adapter_names=[...]``)
work for every prompt-learning method whose adapters in the batch have the same number of virtual
tokens. Nothing here names a method.

On disk an adapter is HF PEFT's format: ``adapter_model.safetensors`` with one tensor,
``prompt_embeddings`` (what the encoder computes; for an MLP-reparameterised encoder that is the
projected output, which loads back as a plain embedding in inference mode), plus any tensors an
encoder keeps under their own top-level keys (``PromptEncoder.top_level_tensors``, e.g. per-task
factors). Encoders may also take per-row ``task_ids`` from ``forward``/``generate``
(``PromptEncoder.takes_task_ids``) and compute the training loss themselves
(``PromptEncoder.computes_loss``).

This module is light (no torch) so plugin entry modules can import the config base class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional

import attrs

from peft_kernel.plugin_api import MAX_SIZE, MAX_WIDTH, ConfigError, PeftConfig, TaskType, check_range

if TYPE_CHECKING:  # annotations only: this module stays free of torch at import
    from torch import nn

__all__ = ["EXTRA_PREFIX", "INJECTIONS", "SAVED_KEY", "PromptLearningConfig", "fill_config"]

INJECTIONS = ("inputs_embeds", "past_key_values")
"""How a prompt-learning method's virtual tokens can enter the model (``PromptLearningConfig.prompt_injection``)."""

SAVED_KEY = "prompt_embeddings"
"""The on-disk key of a prompt-learning adapter's tensor (HF PEFT's format)."""

EXTRA_PREFIX = "prompt_encoder."
"""On-disk prefix of an encoder's optional extra tensors (``PromptEncoder.saved_extras``), which
HF PEFT's loader ignores."""


@attrs.define(kw_only=True)
class PromptLearningConfig(PeftConfig):
    """Fields every prompt-learning config shares (HF PEFT's ``PromptLearningConfig``).

    ``token_dim``, ``num_layers``, ``num_attention_heads`` and ``num_transformer_submodules`` are
    filled from the base model's config when the adapter is created, as HF PEFT does.

    A method's config class sets the class attribute ``prompt_injection`` (one of
    :data:`INJECTIONS`, not a field: it is not saved) to say how its virtual tokens enter the model;
    it is checked when the class is defined.
    """

    prompt_injection: ClassVar[str] = "inputs_embeds"
    """``"inputs_embeds"`` (prepended to the input embeddings) or ``"past_key_values"`` (a key/value
    prefix in every attention layer); see the module docstring."""

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.prompt_injection not in INJECTIONS:
            raise ValueError(f"{cls.__name__}.prompt_injection must be one of {list(INJECTIONS)}, "
                             f"got {cls.prompt_injection!r}")

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        owner = type(self).__name__
        for name in ("num_virtual_tokens", "num_layers", "num_attention_heads"):
            if getattr(self, name) is not None:
                check_range(owner, name, getattr(self, name), 1, MAX_SIZE)
        if self.token_dim is not None:
            check_range(owner, "token_dim", self.token_dim, 1, MAX_WIDTH)
        if self.num_transformer_submodules is not None:
            check_range(owner, "num_transformer_submodules", self.num_transformer_submodules, 1, 2,
                        " (1 for decoder-only and encoder models, 2 for encoder-decoder)")

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def check_ready(self) -> None:
        """Raise :class:`ConfigError` when a field the adapter needs is missing or not positive."""
        for name in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                hint = " (how many virtual tokens to learn)" if name == "num_virtual_tokens" else (
                    " (it could not be read from the base model's config; set it in the config)")
                raise ConfigError(f"{type(self).__name__}.{name} must be a positive int, got {value!r}{hint}.")


# ---- config filling ---------------------------------------------------------------------------
def text_config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # pragma: no cover - exotic configs
            return config
    return config


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def fill_config(config: PromptLearningConfig, model: nn.Module) -> None:
    """Fill the model-dependent fields HF PEFT fills (only those still ``None``)."""
    mc = text_config_of(model)
    if config.num_layers is None:
        config.num_layers = _first(mc, "num_hidden_layers", "num_layers", "n_layer")
    if config.token_dim is None:
        config.token_dim = _first(mc, "hidden_size", "n_embd", "d_model")
        heads = config.num_attention_heads or _first(mc, "num_attention_heads", "n_head", "num_heads")
        kv_heads = getattr(mc, "num_key_value_heads", None)
        if config.prompt_injection == "past_key_values" and kv_heads and heads and config.token_dim:
            # the prefix is a key/value cache: its width per layer is kv_heads * head_dim
            config.token_dim = config.token_dim // heads * kv_heads
            config.num_attention_heads = kv_heads
    if config.num_attention_heads is None:
        config.num_attention_heads = _first(mc, "num_attention_heads", "n_head", "num_heads")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1


