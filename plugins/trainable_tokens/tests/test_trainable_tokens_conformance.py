"""Trainable Tokens runs the conformance suite (cross-loading against HF peft included): untied
(Llama) and tied (GPT-2: ``wte`` and ``lm_head`` share the rows) embeddings, BERT, T5."""

from peft_kernel_testing import ConformanceCase, conformance_suite
from peft_kernel_trainable_tokens import TrainableTokensConfig


def tokens(**kwargs):
    return lambda: TrainableTokensConfig(**{"token_indices": list(range(1, 64, 3)), **kwargs})


CASES = [
    ConformanceCase("llama", tokens(), id="llama-defaults"),
    ConformanceCase("llama", tokens(target_modules=["embed_tokens"], token_indices=list(range(60, 0, -2)), init_weights=False),
                    id="llama-named-random-init"),
    ConformanceCase("gpt2", tokens(), id="gpt2-tied"),
    ConformanceCase("bert", tokens(task_type="SEQ_CLS")),
    ConformanceCase("t5", tokens(), id="t5-defaults"),
]

TestTrainableTokensConformance = conformance_suite(CASES)
