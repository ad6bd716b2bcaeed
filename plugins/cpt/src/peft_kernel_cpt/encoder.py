"""``CPTEmbedding``: the context's token embeddings plus a trained delta kept within an epsilon
ball per token, and CPT's loss over the label tokens of the context and the input."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel_cpt.config import CPTConfig
from peft_kernel_prompt_learning.learner import PromptEncoder
from peft_kernel_prompt_learning.text_init import embedded_tokens

FROZEN_EPSILON = 1e-10
"""The radius label tokens and untyped tokens are projected into (HF PEFT's, not scaled): they do not move."""

REFERENCE_DIM = 2048
"""Epsilons are scaled by ``sqrt(token_dim / REFERENCE_DIM)`` (HF PEFT's)."""


def is_label(types: torch.Tensor) -> torch.Tensor:
    """Where ``types`` marks a label token (``4k + 4``)."""
    return (types > 0) & (types % 4 == 0)


class CPTEmbedding(PromptEncoder):
    """Virtual tokens ``embedding.weight + delta_embedding.weight`` (HF PEFT's ``CPTEmbedding``).

    ``embedding`` holds the context tokens' embeddings (frozen); ``delta_embedding`` is trained, only
    on template and input tokens (label and untyped rows get no gradient), and projected back into
    each token's epsilon ball whenever the virtual tokens are computed, as HF PEFT does. The
    checkpoint holds the sum (``prompt_embeddings``), which loads into ``embedding`` with a zero delta.
    """

    computes_loss = True
    loss_inputs = ("input_type_mask",)

    def __init__(self, config: CPTConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        total, dim = config.num_virtual_tokens, config.token_dim
        self.weighted = config.opt_weighted_loss_type == "decay"
        self.decay = float(config.opt_loss_decay_factor)
        self.embedding = nn.Embedding(total, dim)
        self.delta_embedding = nn.Embedding(total, dim)
        if not config.inference_mode:
            self.embedding.weight = nn.Parameter(embedded_tokens(word_embeddings, config.cpt_token_ids))
        self.embedding.weight.requires_grad_(False)
        with torch.no_grad():
            self.delta_embedding.weight.zero_()
        types = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long)
        self.register_buffer("token_ids", torch.tensor(config.cpt_token_ids, dtype=torch.long), persistent=False)
        self.register_buffer("token_types", types, persistent=False)
        roles = types % 4
        trained = (types > 0) & (roles != 0)
        epsilon = torch.where(roles == 2, float(config.opt_projection_epsilon), float(config.opt_projection_format_epsilon))
        epsilon = torch.where(trained, epsilon * math.sqrt(dim / REFERENCE_DIM), FROZEN_EPSILON)
        self.register_buffer("epsilon", epsilon, persistent=False)
        self.register_buffer("trained", trained[:, None].float(), persistent=False)

    def project(self) -> None:
        """Scale every delta row longer than its token's epsilon back onto the epsilon sphere."""
        with torch.no_grad():
            delta = self.delta_embedding.weight
            norms = delta.norm(dim=1)
            eps = self.epsilon.to(norms.dtype)
            delta.mul_(torch.where(norms > eps, eps / norms, torch.ones_like(norms))[:, None])

    def forward(self) -> torch.Tensor:
        self.project()
        delta = self.delta_embedding.weight
        mask = self.trained.to(delta.dtype)
        # label and untyped rows keep their value but get no gradient
        return self.embedding.weight + delta * mask + delta.detach() * (1 - mask)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, input_type_mask: torch.Tensor | None = None,
             **_: object) -> torch.Tensor:
        """Mean cross-entropy over the label tokens (context and input; every input token when
        ``input_type_mask`` is not given) whose label is not -100,
        each weighted ``decay ** (later examples in its row)`` with ``"decay"``."""
        batch, n = labels.shape[0], self.token_ids.shape[0]
        device = logits.device
        labels = labels.to(device).long()
        # without types every input token is a label of one last example (as in HF PEFT)
        given = (torch.full_like(labels, 4) if input_type_mask is None
                 else torch.as_tensor(input_type_mask, device=device).long())
        if given.shape != labels.shape:
            raise ValueError(f"input_type_mask must have the labels' shape {tuple(labels.shape)}, got {tuple(given.shape)}.")
        given = torch.where(given > 0, given + self.token_types.max(), given)  # the input continues the context's numbering
        types = torch.cat([self.token_types.to(device).expand(batch, n), given], dim=1)[:, 1:]
        targets = torch.cat([self.token_ids.to(device).expand(batch, n), labels], dim=1)[:, 1:]
        losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=-100)
        labelled = is_label(types)
        if self.weighted:
            losses = losses * self._decay_weights(types, labelled)
        return losses[labelled & (targets != -100)].mean()

    def _decay_weights(self, types: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """``decay ** k`` at each label token, ``k`` the number of later label examples in its row."""
        rows = torch.arange(types.shape[0], device=types.device)[:, None].expand_as(types)[labelled]
        span = int(types.max()) + 1
        keys, inverse = torch.unique(rows * span + types[labelled], return_inverse=True)
        key_rows = keys // span
        per_row = torch.bincount(key_rows, minlength=types.shape[0])
        first = torch.cumsum(per_row, 0) - per_row
        later = per_row[key_rows] - 1 - (torch.arange(keys.shape[0], device=types.device) - first[key_rows])
        weights = torch.ones(types.shape, dtype=torch.float32, device=types.device)
        weights[labelled] = self.decay ** later[inverse].float()
        return weights
