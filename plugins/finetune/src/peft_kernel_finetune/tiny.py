"""The embedded default model: the demo's tiny Llama (random weights from a fixed seed, built from
a config, no download) with a word-level tokenizer over the bundled data's words.

``finetune`` saves both to ``<output>/base_model`` (about half a megabyte) so that the adapter's
``base_model_name_or_path`` names a folder that ``from_pretrained`` opens: HF PEFT's
``AutoPeftModelForCausalLM.from_pretrained(<output>)`` and ours load the adapter onto it.
"""

from __future__ import annotations

from typing import Any, Iterable

BASE_SEED = 0
"""The base model's weights never change with --seed, which seeds only the adapter and the data."""
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
"""Default targets on the embedded model (the demo's): its random output layer is too weak to
express a confident answer, so the adapter adapts it too."""
LORA_DEFAULTS = {"r": 8, "lora_alpha": 16}


def build_tokenizer(texts: Iterable[str]) -> Any:
    """A ``PreTrainedTokenizerFast``: whitespace-separated words, ``<bos>`` in front, unknown words ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in text.split()} - {PAD, BOS, EOS, UNK})
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                        special_tokens=[(BOS, vocab[BOS])])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   model_max_length=32)


def build_model(tokenizer: Any) -> Any:
    """The demo's 2-layer Llama (hidden size 64) sized to the tokenizer, with its special token ids."""
    from peft_kernel_demo.train import build_base_model

    model = build_base_model(len(tokenizer), seed=BASE_SEED)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr)
        setattr(model.config, attr, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, attr, value)
    return model


def embedded_model(examples: list[dict[str, str]]) -> tuple[Any, Any]:
    """(model, tokenizer) for the bundled data."""
    texts = [e.get("text") or (e["prompt"] + e["completion"]) for e in examples]
    tokenizer = build_tokenizer(texts)
    return build_model(tokenizer), tokenizer
