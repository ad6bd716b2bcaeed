"""Small deterministic models for the conformance suite: toy modules and tiny transformers models
built from configs (nothing is downloaded). ``make_model(kind)`` and ``make_inputs(kind)`` pair up.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

BATCH = 4


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 16)
        self.lin1 = nn.Linear(16, 16)
        self.lin2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv0 = conv(3, 6, 3, padding=1)
        self.conv1 = conv(6, 6, 3)
        self.lin = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(torch.relu(self.conv0(x)))
        return self.lin(h.flatten(2).mean(-1))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12, padding_idx=0)
        self.lin = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(x)).mean(1)


class Conv1DNet(nn.Module):
    """GPT-2 style layers: transformers ``Conv1D`` (weights stored [in, out])."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc = Conv1D(16, 10)
        self.c_proj = Conv1D(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)))


def _tiny_transformer(kind: str) -> nn.Module:
    import transformers as tf

    common = dict(vocab_size=64, pad_token_id=0)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, **common))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, **common))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, **common))
    if kind == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                              word_embed_proj_dim=16, max_position_embeddings=32, **common))
    if kind == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                              num_attention_heads=2, num_labels=3, **common))
    if kind == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2,
                                                         decoder_start_token_id=0, **common))
    raise KeyError(kind)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "conv1d": lambda: ConvNet(1),
    "conv2d": lambda: ConvNet(2),
    "conv3d": lambda: ConvNet(3),
    "embedding": EmbeddingNet,
    "gpt2-conv1d": Conv1DNet,
    **{k: (lambda k=k: _tiny_transformer(k)) for k in ("llama", "mistral", "gpt2", "opt", "bert", "t5")},
}


def make_model(kind: str, seed: int = 0) -> nn.Module:
    """A fresh model of ``kind`` with weights fixed by ``seed``, in eval mode."""
    torch.manual_seed(seed)
    model = MODELS[kind]()
    return model.eval()


def make_inputs(kind: str, seed: int = 1, batch: int = BATCH) -> dict[str, Any]:
    """Keyword inputs for ``model(**inputs)``; the first value has the batch on dim 0."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(batch, 10, generator=g)}
    if kind.startswith("conv") and kind[4] in "123":
        shape = {"conv1d": (12,), "conv2d": (8, 8), "conv3d": (5, 5, 5)}[kind]
        return {"x": torch.randn(batch, 3, *shape, generator=g)}
    if kind == "embedding":
        return {"x": torch.randint(0, 30, (batch, 7), generator=g)}
    if kind == "gpt2-conv1d":
        return {"x": torch.randn(batch, 10, generator=g)}
    ids = torch.randint(1, 64, (batch, 6), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, 64, (batch, 4), generator=g)}
    return {"input_ids": ids}


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output (logits for transformers models)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "start_logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    raise TypeError(f"cannot find the main tensor in {type(output).__name__}")
