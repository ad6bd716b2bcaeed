"""Multitask prompt tuning against HF PEFT (the oracle) on tiny Llama, GPT-2 and BERT: the same
weights give HF's virtual tokens per task, checkpoints cross-load both ways (``prompt_embeddings``
plus the task factors), rows of a mixed batch (adapters and tasks per row) equal single runs,
generate equals greedy decoding through the forward with ``task_ids``, and the inits from a
source checkpoint give HF's tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_kernel
from peft_kernel import PeftModel, get_peft_model
from peft_kernel.errors import CheckpointError, ConfigError, MixedBatchError
from peft_kernel_multitask_prompt_tuning import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
from peft_kernel_testing import make_model, max_abs_diff, perturb, run
from peft_kernel_testing.generation import check_generate_matches_greedy, greedy_decode
from peft_kernel_testing.hf_oracle import hf_oracle

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 11, 12, 13], [0, 0, 21, 22, 23], [7, 7, 7, 8, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
TASKS = torch.tensor([0, 2, 1, 2])
TOL = 1e-5
SAVED = ["prefix_task_cols", "prefix_task_rows", "prompt_embeddings"]


def _kw(**kw):
    return {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "num_tasks": 3, "num_ranks": 2, **kw}


def _ours(kind: str = "llama", seed: int = 0, **kw) -> PeftModel:
    model = get_peft_model(make_model(kind), MultitaskPromptTuningConfig(**_kw(**kw)))
    perturb(model.prompt_encoder, seed, scale=0.5)
    return model.eval()


def _logits(model, **inputs) -> torch.Tensor:
    return run(model, inputs)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_random_init_and_virtual_tokens_equal_hfs(kind):
    """Under one seed both draw the same shared prompt and task factors, and compute the same logits."""
    ours = get_peft_model(make_model(kind), MultitaskPromptTuningConfig(**_kw()))
    with hf_oracle("HF peft building a multitask prompt-tuning adapter"):
        hf = peft.get_peft_model(make_model(kind), peft.MultitaskPromptTuningConfig(**_kw()))
        theirs = hf.prompt_encoder["default"].state_dict()
    mine = ours.prompt_encoder["default"].state_dict()
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    perturb(ours.prompt_encoder, 4, scale=0.5)
    hf.prompt_encoder["default"].load_state_dict(ours.prompt_encoder["default"].state_dict())
    with hf_oracle("HF peft's forward with task_ids"):
        expected = _logits(hf.eval(), input_ids=IDS, attention_mask=MASK, task_ids=TASKS)
        prompt = hf.get_prompt(4, task_ids=TASKS)
    assert max_abs_diff(_logits(ours.eval(), input_ids=IDS, attention_mask=MASK, task_ids=TASKS), expected) <= TOL
    assert max_abs_diff(ours.get_prompt(4, task_ids=TASKS), prompt) <= TOL


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cross_load_both_ways_and_generate_with_task_ids(kind, tmp_path):
    with hf_oracle("HF peft saving a multitask prompt-tuning adapter"):
        hf = peft.get_peft_model(make_model(kind), peft.MultitaskPromptTuningConfig(**_kw())).eval()
        perturb(hf.prompt_encoder, 1, scale=0.5)
        hf.save_pretrained(tmp_path / "hf")
        expected = _logits(hf, input_ids=IDS, attention_mask=MASK, task_ids=TASKS)
        hf_tokens, _ = greedy_decode(hf, IDS, MASK, max_new_tokens=4, task_ids=TASKS)
    ours = PeftModel.from_pretrained(make_model(kind), tmp_path / "hf")
    assert max_abs_diff(_logits(ours, input_ids=IDS, attention_mask=MASK, task_ids=TASKS), expected) <= TOL
    assert torch.equal(check_generate_matches_greedy(ours, IDS, MASK, max_new_tokens=4, task_ids=TASKS), hf_tokens)

    mine = _ours(kind, seed=2)
    mine.save_pretrained(tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == SAVED
    with hf_oracle("HF peft loading our multitask prompt-tuning adapter"):
        theirs = peft.PeftModel.from_pretrained(make_model(kind), tmp_path / "ours")
        got = _logits(theirs, input_ids=IDS, attention_mask=MASK, task_ids=TASKS)
    assert max_abs_diff(got, _logits(mine, input_ids=IDS, attention_mask=MASK, task_ids=TASKS)) <= TOL


def test_sequence_classification_with_bert_cross_loads_both_ways(tmp_path):
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    inputs = dict(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
                  token_type_ids=torch.tensor([[0, 0, 1], [0, 1, 1]]), labels=torch.tensor([0, 2]),
                  task_ids=torch.tensor([1, 0]))
    kw = _kw(task_type="SEQ_CLS", num_tasks=2)
    with hf_oracle("HF peft saving a SEQ_CLS multitask prompt-tuning adapter on BERT"):
        hf = peft.get_peft_model(make_model("bert"), peft.MultitaskPromptTuningConfig(**kw))
        perturb(hf, 3, scale=0.5)
        hf.save_pretrained(tmp_path / "hf")
        hf = peft.PeftModel.from_pretrained(make_model("bert"), tmp_path / "hf")
        with torch.no_grad():
            expected = hf(**inputs)
    ours = PeftModel.from_pretrained(make_model("bert"), tmp_path / "hf")
    with torch.no_grad():
        got = ours(**inputs)
    assert max_abs_diff(got.logits, expected.logits) <= TOL and abs(got.loss.item() - expected.loss.item()) <= TOL
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        SAVED + ["base_model.classifier.bias", "base_model.classifier.weight"])
    with hf_oracle("HF peft loading our SEQ_CLS adapter"):
        back = _logits(peft.PeftModel.from_pretrained(make_model("bert"), tmp_path / "ours"), **inputs)
    assert max_abs_diff(back, got.logits) <= TOL


def test_mixed_batch_rows_with_adapters_and_tasks_equal_single_runs_and_generate():
    model = _ours("llama")
    model.add_adapter("other", MultitaskPromptTuningConfig(**_kw(num_tasks=2, num_ranks=1)))
    perturb(model.prompt_encoder["other"], 7, scale=0.5)
    model.eval()
    names, tasks = ["default", "other", "other", "default"], [0, 1, 0, 2]
    mixed = _logits(model, input_ids=IDS, attention_mask=MASK, adapter_names=names, task_ids=tasks)
    for row, (name, task) in enumerate(zip(names, tasks)):
        model.set_adapter(name)
        single = _logits(model, input_ids=IDS[row: row + 1], attention_mask=MASK[row: row + 1], task_ids=[task])
        assert max_abs_diff(mixed[row: row + 1], single) <= TOL, (row, name, task)
    assert max_abs_diff(mixed[1], mixed[2]) > 1e-3
    check_generate_matches_greedy(model, IDS, MASK, max_new_tokens=4, adapter_names=names, task_ids=torch.tensor(tasks))


def test_generate_with_beams_repeats_each_rows_task():
    model = _ours("llama")
    beams = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        out = model.generate(input_ids=IDS[:2], attention_mask=MASK[:2], task_ids=[2, 0], **beams)
        for row, task in enumerate([2, 0]):
            single = model.generate(input_ids=IDS[row: row + 1], attention_mask=MASK[row: row + 1], task_ids=[task], **beams)
            assert torch.equal(out[2 * row: 2 * row + 2], single)


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_init_from_a_saved_source_checkpoint_equals_hfs(init, suffix, tmp_path):
    source = _ours("llama", seed=5)
    source.save_pretrained(tmp_path)
    path = tmp_path / f"source.{suffix}"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(tensors, path) if suffix == "safetensors" else torch.save(tensors, path)
    kw = _kw(num_tasks=1 if init != "ONLY_SOURCE_SHARED" else 2, prompt_tuning_init=init,
             prompt_tuning_init_state_dict_path=str(path), prompt_tuning_init_task=2)
    mine = get_peft_model(make_model("llama"), MultitaskPromptTuningConfig(**kw)).prompt_encoder["default"].state_dict()
    with hf_oracle(f"HF peft initialising from a source checkpoint ({init})"):
        theirs = peft.get_peft_model(make_model("llama"), peft.MultitaskPromptTuningConfig(**kw))
        theirs = theirs.prompt_encoder["default"].state_dict()
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine), init
    assert torch.equal(mine["embedding.weight"], tensors["prompt_embeddings"])
    if init == "AVERAGE_SOURCE_TASKS":
        assert torch.allclose(mine["prefix_task_rows"], tensors["prefix_task_rows"].mean(0, keepdim=True))
    elif init == "EXACT_SOURCE_TASK":
        assert torch.equal(mine["prefix_task_cols"], tensors["prefix_task_cols"][2:])


def test_a_saved_adapter_loads_without_its_init_source(tmp_path):
    """HF PEFT reads the init source again when loading (FileNotFoundError once it is gone); we do not need it."""
    _ours("llama", seed=5).save_pretrained(tmp_path / "src")
    source = tmp_path / "src" / "adapter_model.safetensors"
    kw = _kw(num_tasks=1, prompt_tuning_init="AVERAGE_SOURCE_TASKS", prompt_tuning_init_state_dict_path=str(source))
    trained = get_peft_model(make_model("llama"), MultitaskPromptTuningConfig(**kw)).eval()
    trained.save_pretrained(tmp_path / "out")
    source.unlink()
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "out")
    expected = _logits(trained, input_ids=IDS, task_ids=[0, 0, 0, 0])
    assert max_abs_diff(_logits(loaded, input_ids=IDS, task_ids=[0, 0, 0, 0]), expected) == 0


def test_source_init_errors_name_the_problem(tmp_path):
    source = tmp_path / "s.safetensors"
    save_file({"prompt_embeddings": torch.zeros(3, 16)}, source)
    with pytest.raises(CheckpointError, match="prefix_task_cols"):
        get_peft_model(make_model("llama"), MultitaskPromptTuningConfig(**_kw(
            num_tasks=1, prompt_tuning_init="AVERAGE_SOURCE_TASKS", prompt_tuning_init_state_dict_path=str(source))))
    only_shared = _kw(num_tasks=2, prompt_tuning_init="ONLY_SOURCE_SHARED", prompt_tuning_init_state_dict_path=str(source))
    model = get_peft_model(make_model("llama"), MultitaskPromptTuningConfig(**only_shared))  # a prompt-tuning source
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, torch.zeros(3, 16))
    with pytest.raises(CheckpointError, match="does not fit"):
        get_peft_model(make_model("llama"), MultitaskPromptTuningConfig(**_kw(
            num_virtual_tokens=4, prompt_tuning_init="ONLY_SOURCE_SHARED", prompt_tuning_init_state_dict_path=str(source))))
    with pytest.raises(FileNotFoundError, match="not a file"):
        get_peft_model(make_model("llama"), MultitaskPromptTuningConfig(**_kw(
            prompt_tuning_init="ONLY_SOURCE_SHARED", prompt_tuning_init_state_dict_path=str(tmp_path / "none"))))


def test_missing_or_bad_task_ids_raise_clear_errors_as_hf():
    model = _ours("llama")
    with pytest.raises(MixedBatchError, match="task_ids cannot be None"):  # a ValueError, as HF's
        model(input_ids=IDS)
    with pytest.raises(MixedBatchError, match="task_ids cannot be None"):
        model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=2)
    with pytest.raises(MixedBatchError, match=r"in \[0, 3\)"):
        model(input_ids=IDS, task_ids=[0, 1, 2, 3])
    with pytest.raises(MixedBatchError, match="one integer task id per batch row"):
        model(input_ids=IDS, task_ids=[0, 1, 2])
    with hf_oracle("HF peft without task_ids"), pytest.raises(ValueError, match="task_ids cannot be None"):
        peft.get_peft_model(make_model("llama"), peft.MultitaskPromptTuningConfig(**_kw()))(input_ids=IDS)


def test_training_updates_only_the_adapter_and_only_the_rows_tasks():
    model = get_peft_model(make_model("llama"), MultitaskPromptTuningConfig(**_kw()))
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    before = {k: v.clone() for k, v in model.prompt_encoder.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=IDS, attention_mask=MASK, labels=IDS, task_ids=[0, 2, 0, 2]).loss.backward()
        opt.step()
    after = model.prompt_encoder.state_dict()
    assert all(torch.equal(v, model.get_base_model().state_dict()[k]) for k, v in base.items())
    cols = "default.prefix_task_cols"
    assert not torch.equal(after[cols][0], before[cols][0]) and not torch.equal(after[cols][2], before[cols][2])
    assert torch.equal(after[cols][1], before[cols][1])  # task 1 had no row
    assert not torch.equal(after["default.embedding.weight"], before["default.embedding.weight"])


def test_text_init_matches_hf(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "classify", "the", "tweet"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(tmp_path)
    kw = _kw(num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the tweet",
             tokenizer_name_or_path=str(tmp_path))
    mine = get_peft_model(make_model("llama"), MultitaskPromptTuningConfig(**kw)).prompt_encoder["default"].state_dict()
    with hf_oracle("HF peft's TEXT init of multitask prompt tuning"):
        theirs = peft.get_peft_model(make_model("llama"), peft.MultitaskPromptTuningConfig(**kw))
        theirs = theirs.prompt_encoder["default"].state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    emb = make_model("llama").get_input_embeddings().weight
    assert torch.equal(mine["embedding.weight"][3], emb[2])  # "classify", repeated


def test_config_fields_and_defaults_match_hf():
    ours = MultitaskPromptTuningConfig().to_dict()
    theirs = {f.name: f.default for f in dataclasses.fields(peft.MultitaskPromptTuningConfig)}
    assert set(ours) == set(theirs)
    for name in ("num_tasks", "num_ranks", "prompt_tuning_init_task", "prompt_tuning_init_state_dict_path"):
        assert ours[name] == theirs[name], name
    assert ours["prompt_tuning_init"] == "RANDOM" and ours["peft_type"] == "MULTITASK_PROMPT_TUNING"
    assert [i.value for i in MultitaskPromptTuningInit] == [i.value for i in peft.MultitaskPromptTuningInit]
    assert peft_kernel.MultitaskPromptTuningConfig is MultitaskPromptTuningConfig


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt_tuning_init": "FOO"}, "prompt_tuning_init must be one of"),
    ({"num_tasks": 0}, "num_tasks"),
    ({"num_ranks": 0}, "num_ranks"),
    ({"prompt_tuning_init_task": -1}, "prompt_tuning_init_task"),
    ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}, "tokenizer_name_or_path can't be None"),
    ({"tokenizer_kwargs": {"a": 1}}, "tokenizer_kwargs only valid"),
    ({"prompt_tuning_init": "EXACT_SOURCE_TASK"}, "prompt_tuning_init_state_dict_path needs to be specified"),
    ({"prompt_tuning_init": "AVERAGE_SOURCE_TASKS", "prompt_tuning_init_state_dict_path": "x", "num_tasks": 2},
     "num_tasks must be 1"),
])
def test_bad_configs_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MultitaskPromptTuningConfig(num_virtual_tokens=3, **kwargs)
