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
from peft_kernel.errors import MixedBatchError
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


def _outputs(model, first: int = 4, **routing) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(logits, loss)`` of the first ``first`` calls of :func:`_calls`."""
    with torch.no_grad():
        outs = [model(input_ids=IDS, attention_mask=MASK, **call, **routing) for call in _calls(model)[:first]]
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


def test_mixed_batch_rows_with_adapters_and_tasks_equal_single_runs_and_generate():
    model = _ours("t5")
    model.add_adapter("other", MultitaskPromptTuningConfig(**_kw(num_tasks=2, num_ranks=1)))
    perturb(model.prompt_encoder["other"], 7, scale=1.0)
    model.eval()
    names, tasks = ["default", "other", "other", "default"], torch.tensor([0, 1, 0, 2])
    mixed = _outputs(model, adapter_names=names, task_ids=tasks)
    for i, call in enumerate(_calls(model)):
        for row, (name, task) in enumerate(zip(names, tasks.tolist())):
            model.set_adapter(name)
            single = {k: v[row: row + 1] for k, v in {"input_ids": IDS, "attention_mask": MASK, **call}.items()}
            with torch.no_grad():
                logits = model(**single, task_ids=[task]).logits
            assert max_abs_diff(mixed[i][0][row: row + 1], logits) <= TOL, (i, row, name, task)
    assert max_abs_diff(mixed[0][0][1], mixed[0][0][2]) > 1e-3  # same adapter, other task
    check_seq2seq_generate(model, IDS, MASK, adapter_names=names, task_ids=tasks)
    with torch.no_grad():  # beam search expands every row: each beam keeps its row's adapter and task
        beams = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=4, num_beams=3,
                               adapter_names=names, task_ids=tasks)
        for row, (name, task) in enumerate(zip(names, tasks.tolist())):
            model.set_adapter(name)
            single = model.generate(input_ids=IDS[row: row + 1], attention_mask=MASK[row: row + 1], max_new_tokens=4,
                                    num_beams=3, task_ids=[task])
            assert torch.equal(beams[row: row + 1, : single.shape[1]], single), (row, name, task)


def test_training_changes_only_the_prompt_parameters():
    model = _ours("bart").train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"prompt_encoder.default.{k}" for k in ("embedding.weight", "prefix_task_cols", "prefix_task_rows")}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=IDS, attention_mask=MASK, labels=LABELS, task_ids=TASKS).loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == (name in trainable), name


def test_one_submodule_prompts_the_encoder_only_as_hf(tmp_path):
    """``num_transformer_submodules=1``: ``n`` tokens, all in front of the encoder; the decoder keeps
    its inputs. HF then drops a ``decoder_inputs_embeds`` it is given and still puts ``n`` ones in
    front of ``decoder_attention_mask`` (longer than the decoder's inputs, so the mask's zeros land on
    other tokens); ours keeps both as given, so only the call with labels alone is compared."""
    with hf_oracle("HF peft saving one-submodule seq2seq multitask prompt tuning"):
        hf = peft.get_peft_model(seq2seq_model("t5"), peft.MultitaskPromptTuningConfig(**_kw(num_transformer_submodules=1)))
        perturb(hf.prompt_encoder, 5, scale=1.0)
        hf.eval().save_pretrained(tmp_path)
        expected = _outputs(hf, first=1, task_ids=TASKS)
    ours = PeftModel.from_pretrained(seq2seq_model("t5"), tmp_path)
    assert tuple(ours.get_prompt_embedding_to_save("default").shape) == (N, 16)
    got = _outputs(ours, task_ids=TASKS)
    _assert_same(got[:1], expected)
    assert got[0][0].shape[1] == LABELS.shape[1]
    with torch.no_grad():  # the independent oracle: the base model with the encoder's tokens prepended
        embeds = torch.cat([ours.get_prompt(4, task_ids=TASKS), ours.word_embeddings(IDS)], dim=1)
        mask = torch.cat([torch.ones(4, N, dtype=MASK.dtype), MASK], dim=1)
        plain = ours.base_model(inputs_embeds=embeds, attention_mask=mask, labels=LABELS, decoder_attention_mask=DECODER_MASK)
    _assert_same(got[1:2], [(plain.logits, plain.loss)])
    with pytest.raises(MixedBatchError, match="num_transformer_submodules"):
        ours.add_adapter("two", MultitaskPromptTuningConfig(**_kw()))
        ours(input_ids=IDS, labels=LABELS, task_ids=TASKS, adapter_names=["default", "two", "two", "default"])


def test_decoder_inputs_are_needed_once():
    model = _ours("t5")
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=IDS, decoder_input_ids=DECODER_IDS, decoder_inputs_embeds=model.word_embeddings(DECODER_IDS),
              task_ids=TASKS)
    with pytest.raises(ValueError, match="decoder_input_ids, decoder_inputs_embeds or labels"):
        model(input_ids=IDS, task_ids=TASKS)
    with pytest.raises(MixedBatchError, match="task_ids"):
        model(input_ids=IDS, labels=LABELS)
    with pytest.raises(MixedBatchError, match="task_ids"):
        model.generate(input_ids=IDS, max_new_tokens=2)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_continues_given_decoder_inputs(use_cache):
    """``decoder_input_ids`` (and a decoder mask) given to ``generate`` follow the decoder's virtual tokens."""
    model = _ours("t5", seed=4)
    first = torch.full((4, 1), model.generation_config.decoder_start_token_id)  # else generate puts it in front
    start = torch.cat([first, DECODER_IDS[:, 1:3]], dim=1)
    expected, _ = greedy_decode(DecoderView(model, IDS, MASK), start, None, 3, task_ids=TASKS)
    with torch.no_grad():
        for mask in ({}, {"decoder_attention_mask": torch.ones_like(start)}):
            got = model.generate(input_ids=IDS, attention_mask=MASK, decoder_input_ids=start, max_new_tokens=3,
                                 do_sample=False, use_cache=use_cache, task_ids=TASKS, **mask)
            assert torch.equal(got, expected), mask
