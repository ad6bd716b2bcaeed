"""``PromptEncoderConfig``: HF PEFT's fields, names and defaults, plus ``save_encoder`` (ours)."""

from __future__ import annotations

import enum
import warnings
from typing import Optional, Union

import attrs

from peft_kernel.plugin_api import MAX_SIZE, MAX_WIDTH, OMIT_DEFAULT, ConfigError, PeftType, check_range
from peft_kernel_prompt_learning import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network between the virtual-token embeddings and the virtual tokens (HF PEFT's enum)."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@attrs.define(kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of a P-tuning adapter (HF PEFT's ``PromptEncoderConfig``).

    The virtual tokens are an embedding passed through an MLP (``token_dim -> encoder_hidden_size ->
    encoder_hidden_size -> token_dim``, ReLUs between) or a bidirectional LSTM of
    ``encoder_num_layers`` layers followed by a two-layer MLP. ``encoder_hidden_size`` defaults to
    ``token_dim``. As in HF PEFT the checkpoint holds the encoder's *output* (``prompt_embeddings``),
    which loads back as a plain embedding for inference.

    ``save_encoder=True`` (ours; HF PEFT has no such field and its loader ignores the extra tensors)
    also saves the encoder's weights, so training can resume from the checkpoint
    (``PeftModel.from_pretrained(..., is_trainable=True)``). It is left out of
    ``adapter_config.json`` while ``False``.
    """

    peft_type: Optional[Union[PeftType, str]] = PeftType.P_TUNING
    encoder_reparameterization_type: Union[PromptEncoderReparameterizationType, str] = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    save_encoder: bool = attrs.field(default=False, metadata={OMIT_DEFAULT: True})

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.peft_type = PeftType.P_TUNING
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(str(kind).upper())
        except ValueError:
            raise ConfigError(
                "PromptEncoderConfig.encoder_reparameterization_type must be one of "
                f"{[t.value for t in PromptEncoderReparameterizationType]}, got {kind!r}."
            ) from None
        if self.encoder_hidden_size is not None:
            check_range("PromptEncoderConfig", "encoder_hidden_size", self.encoder_hidden_size, 1, MAX_WIDTH)
        check_range("PromptEncoderConfig", "encoder_num_layers", self.encoder_num_layers, 1, MAX_SIZE)
        if isinstance(self.encoder_dropout, bool) or not isinstance(self.encoder_dropout, (int, float)) or not (
            0 <= self.encoder_dropout < 1
        ):
            raise ConfigError(f"PromptEncoderConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}.")
        if not isinstance(self.save_encoder, bool):
            raise ConfigError(f"PromptEncoderConfig.save_encoder must be a bool, got {self.save_encoder!r}.")
        if (self.encoder_reparameterization_type == PromptEncoderReparameterizationType.MLP
                and self.encoder_num_layers != 2 and not self.inference_mode):
            warnings.warn(f"for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used "
                          f"(got encoder_num_layers={self.encoder_num_layers}).", UserWarning, stacklevel=3)
