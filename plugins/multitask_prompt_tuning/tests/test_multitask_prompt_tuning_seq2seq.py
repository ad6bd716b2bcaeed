"""Multitask prompt tuning on encoder-decoder models (tiny T5 and BART, ``task_type="SEQ_2_SEQ_LM"``)
against HF PEFT, the oracle.

What HF PEFT 0.21.2 does there (observed by running it under transformers 5.24): the adapter learns
``2n`` virtual tokens per task row (``num_transformer_submodules=2``); the first ``n`` go in front of the
*encoder's* input embeddings (``attention_mask`` gets ones), the last ``n`` in front of the *decoder's*
(made from ``decoder_inputs_embeds``, or from the labels shifted right), ``decoder_attention_mask``
gets ones and the labels ``-100`` in front; the logits cover the decoder's virtual tokens too.

Where HF is wrong, an independent oracle stands in:

- HF's forward fails on ``decoder_input_ids`` (TypeError): ours embeds them, equal to passing their
  embeddings as ``decoder_inputs_embeds`` (which HF takes);
- HF's ``generate`` prompts the encoder only, so it does not follow HF's own forward (the model a user
  trained): ours is checked against greedy decoding through our forward, which equals HF's forward.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peft_kernel import PeftModel, get_peft_model
from peft_kernel_multitask_prompt_tuning import MultitaskPromptTuningConfig
from peft_kernel_testing import greedy_decode, max_abs_diff, perturb
from peft_kernel_testing.hf_oracle import hf_oracle
from peft_kernel_testing.seq2seq import SEQ2SEQ_KINDS, DecoderView, check_seq2seq_generate, seq2seq_model

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

TOL = 1e-5
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [3, 4, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26], [7, 7, 7, 8, 9, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
DECODER_IDS = torch.tensor([[3, 17, 40, 12], [3, 9, 8, 33], [3, 50, 51, 52], [3, 5, 5, 6]])
DECODER_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
LABELS = torch.tensor([[17, 40, 12, 1], [9, 8, 33, -100], [50, 51, -100, -100], [5, 5, 6, 1]])
TASKS = torch.tensor([0, 2, 1, 2])
N = 2  # virtual tokens per submodule; more shift tiny BART's decoder positions so far that every row decodes alike


def _kw(**kw):
    return {"task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": N, "num_tasks": 3, "num_ranks": 2, **kw}


def _ours(kind: str, seed: int = 0, **kw) -> PeftModel:
    model = get_peft_model(seq2seq_model(kind), MultitaskPromptTuningConfig(**_kw(**kw)))
    perturb(model.prompt_encoder, seed, scale=1.0)
    return model.eval()


def _calls(model) -> list[dict[str, torch.Tensor]]:
    """Forward inputs HF PEFT takes (it fails on ``decoder_input_ids``; their embeddings stand in)."""
    embeds = model.word_embeddings(DECODER_IDS).detach()
    return [
        {"labels": LABELS},  # decoder inputs from the labels
        {"labels": LABELS, "decoder_attention_mask": DECODER_MASK},
        {"decoder_inputs_embeds": embeds, "labels": LABELS},
        {"decoder_inputs_embeds": embeds, "decoder_attention_mask": DECODER_MASK},
    ]


def _outputs(model, **routing) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    with torch.no_grad():
        outs = [model(input_ids=IDS, attention_mask=MASK, **call, **routing) for call in _calls(model)]
    return [(out.logits, out.get("loss")) for out in outs]


def _assert_same(got: list, expected: list) -> None:
    for i, ((logits, loss), (want_logits, want_loss)) in enumerate(zip(got, expected)):
        assert logits.shape == want_logits.shape and max_abs_diff(logits, want_logits) <= TOL, i
        assert (loss is None) == (want_loss is None), i
        if loss is not None:
            assert abs(loss.item() - want_loss.item()) <= TOL, i


@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_hf_checkpoint_loads_with_equal_logits_and_loss_per_task(kind, tmp_path):
    with hf_oracle("HF peft saving a seq2seq multitask prompt-tuning adapter"):
        hf = peft.get_peft_model(seq2seq_model(kind), peft.MultitaskPromptTuningConfig(**_kw())).eval()
        perturb(hf.prompt_encoder, 1, scale=1.0)
        hf.save_pretrained(tmp_path)
        expected = _outputs(hf, task_ids=TASKS)
        with pytest.raises(TypeError):  # HF's forward cannot take decoder_input_ids here
            hf(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DECODER_IDS, task_ids=TASKS)
    ours = PeftModel.from_pretrained(seq2seq_model(kind), tmp_path)
    assert type(ours).__name__ == "PeftModelForSeq2SeqLM"
    assert ours.peft_config["default"].num_transformer_submodules == 2
    got = _outputs(ours, task_ids=TASKS)
    _assert_same(got, expected)
    assert got[0][0].shape[1] == N + LABELS.shape[1]  # the decoder's virtual tokens have logits too
    with torch.no_grad():
        by_ids = ours(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DECODER_IDS,
                      decoder_attention_mask=DECODER_MASK, task_ids=TASKS).logits
    assert max_abs_diff(by_ids, expected[3][0]) <= TOL  # equal to HF given the ids' embeddings


@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_our_checkpoint_loads_in_hf_with_equal_outputs(kind, tmp_path):
    ours = _ours(kind, seed=2)
    ours.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "prompt_embeddings": (2 * N, 16), "prefix_task_cols": (3, 2 * N, 2), "prefix_task_rows": (3, 2, 16)}
    with hf_oracle("HF peft loading our seq2seq multitask prompt-tuning adapter"):
        theirs = peft.PeftModel.from_pretrained(seq2seq_model(kind), tmp_path).eval()
        got = _outputs(theirs, task_ids=TASKS)
    _assert_same(got, _outputs(ours, task_ids=TASKS))


@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_generate_equals_greedy_decoding_through_the_forward_with_task_ids(kind, tmp_path):
    """Ours prompts the decoder in ``generate`` as in the forward; HF's ``generate`` does not (it
    equals greedy decoding with the encoder's virtual tokens only), so it is not the oracle here."""
    with hf_oracle("HF peft generating with a seq2seq multitask prompt-tuning adapter"):
        hf = peft.get_peft_model(seq2seq_model(kind), peft.MultitaskPromptTuningConfig(**_kw())).eval()
        perturb(hf.prompt_encoder, 3, scale=1.0)
        hf.save_pretrained(tmp_path)
        with torch.no_grad():
            hf_generated = hf.generate(input_ids=IDS, attention_mask=MASK, task_ids=TASKS, max_new_tokens=4,
                                       do_sample=False)
        start = torch.full((4, 1), hf.generation_config.decoder_start_token_id)
        view = DecoderView(hf, IDS, MASK)
        view.forward = lambda input_ids, attention_mask, **kw: hf(  # HF's forward takes decoder embeddings only
            input_ids=IDS, attention_mask=MASK, decoder_inputs_embeds=hf.word_embeddings(input_ids), **kw)
        hf_greedy, _ = greedy_decode(view, start, None, 4, task_ids=TASKS)
    ours = PeftModel.from_pretrained(seq2seq_model(kind), tmp_path)
    tokens = check_seq2seq_generate(ours, IDS, MASK, task_ids=TASKS)
    assert torch.equal(tokens, hf_greedy)
    assert len({tuple(row) for row in tokens.tolist()}) > 1  # the check is not vacuous
    assert not torch.equal(hf_generated, hf_greedy)  # HF's generate leaves the decoder's tokens out
