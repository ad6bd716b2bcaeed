"""Prompt tuning against HF PEFT (the oracle) on tiny Llama and GPT-2 models, plus mixed batches.

The conformance suite targets layer adapters (merge, unload, per-layer checks); prompt learning
runs the equivalent checks here: cross-loading both ways, save/load round trip, disable == base,
only prompt parameters train, mixed-batch rows == single-adapter runs, generate, bad configs.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peft_kernel
from peft_kernel import PeftConfig, PeftModel, get_peft_model
from peft_kernel.errors import CheckpointError, ConfigError, MixedBatchError
from peft_kernel_testing import make_model, max_abs_diff, perturb, run
from peft_kernel_testing.generation import check_generate_matches_greedy, greedy_decode
from peft_kernel_testing.hf_oracle import check_seq_cls_cross_load, hf_oracle
from peft_kernel_prompt_tuning import PromptTuningConfig, PromptTuningInit

peft = pytest.importorskip("peft", reason="HF peft (the test oracle) is not installed")

MODELS = ["llama", "gpt2"]
IDS = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 11, 12, 13], [0, 0, 21, 22, 23], [7, 7, 7, 8, 9]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
TOL = 1e-5


def _perturb(module: torch.nn.Module, seed: int) -> None:
    perturb(module, seed, scale=0.5)


def _ours(kind: str, seed: int = 0, name: str = "default", **kw) -> PeftModel:
    model = get_peft_model(make_model(kind), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **kw), name)
    _perturb(model.prompt_encoder, seed)
    return model.eval()


def _logits(model, **inputs) -> torch.Tensor:
    return run(model, inputs)


@pytest.mark.parametrize("kind", MODELS)
def test_hf_saved_adapter_loads_with_equal_outputs(kind, tmp_path):
    """HF saves, ours loads: equal logits and loss, and equal greedy decoding through each library's
    forward (padded rows included). Our generate is checked against greedy decoding through our own
    forward, not against HF peft's generate, which is no independent oracle."""
    with hf_oracle("HF peft building and saving a prompt"):
        hf = peft.get_peft_model(make_model(kind), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
        _perturb(hf.prompt_encoder, 1)
        hf.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make_model(kind), tmp_path)
    assert type(ours).__name__ == "PeftModelForCausalLM" and type(ours.base_model) is type(make_model(kind))
    with torch.no_grad():
        b = ours(input_ids=IDS, attention_mask=MASK, labels=IDS)
    assert b.logits.shape == (4, 9, 64)
    tokens = check_generate_matches_greedy(ours, IDS, MASK, max_new_tokens=4)
    with hf_oracle("HF peft running the prompt it saved"):
        with torch.no_grad():
            a = hf(input_ids=IDS, attention_mask=MASK, labels=IDS)
        hf_plain = _logits(hf, input_ids=IDS)
        hf_tokens, hf_steps = greedy_decode(hf, IDS, MASK, max_new_tokens=4)
    assert max_abs_diff(a.logits, b.logits) <= TOL and abs(a.loss.item() - b.loss.item()) <= TOL
    assert max_abs_diff(hf_plain, _logits(ours, input_ids=IDS)) <= TOL
    assert torch.equal(hf_tokens, tokens)
    assert max_abs_diff(hf_steps, greedy_decode(ours, IDS, MASK, max_new_tokens=4)[1]) <= TOL


@pytest.mark.parametrize("kind", MODELS)
def test_our_adapter_loads_in_hf_with_equal_outputs(kind, tmp_path):
    ours = _ours(kind)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    with hf_oracle("HF peft building and running its own prompt (the control)"):
        reference = peft.get_peft_model(make_model(kind), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        _logits(reference.eval(), input_ids=IDS, attention_mask=MASK)
    hf = peft.PeftModel.from_pretrained(make_model(kind), tmp_path)  # HF reading our files: the check itself
    assert saved == json.loads(json.dumps(hf.peft_config["default"].to_dict(), default=str)) | {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "prompt_tuning_init": "RANDOM"}
    assert saved["token_dim"] == 16 and saved["num_layers"] == 2 and saved["num_transformer_submodules"] == 1
    assert max_abs_diff(_logits(hf, input_ids=IDS, attention_mask=MASK), _logits(ours, input_ids=IDS, attention_mask=MASK)) <= TOL


def test_state_dict_format_and_round_trip(tmp_path):
    ours = _ours("llama")
    ours.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (3, 16)
    assert load_file(tmp_path / "other" / "adapter_model.safetensors")["prompt_embeddings"].shape == (2, 16)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    assert max_abs_diff(_logits(loaded, input_ids=IDS), _logits(ours, input_ids=IDS)) == 0
    ours.set_adapter("other")
    loaded.set_adapter("other")
    assert max_abs_diff(_logits(loaded, input_ids=IDS), _logits(ours, input_ids=IDS)) == 0
    assert not loaded.training and loaded.peft_config["default"].inference_mode


def test_load_rejects_foreign_checkpoint(tmp_path):
    ours = _ours("llama")
    ours.save_pretrained(tmp_path)
    other = _ours("llama")
    other.add_adapter("x", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shape \(3, 16\).*\(5, 16\)"):
        other.load_adapter(tmp_path, "x")
    assert list(other.peft_config) == ["default", "x"]  # a failed load into an existing adapter keeps it as it was
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("kind", MODELS)
def test_disable_is_base_and_output_changes(kind):
    ours = _ours(kind)
    base = make_model(kind)
    n = 3
    out = _logits(ours, input_ids=IDS, attention_mask=MASK)
    with ours.disable_adapter():
        assert max_abs_diff(_logits(ours, input_ids=IDS, attention_mask=MASK), _logits(base, input_ids=IDS, attention_mask=MASK)) == 0
        assert torch.equal(ours.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False),
                           base.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False))
    assert out.shape[1] == IDS.shape[1] + n
    assert max_abs_diff(out[:, n:], _logits(base, input_ids=IDS, attention_mask=MASK)) > 1e-3


def test_only_prompt_parameters_train():
    model = get_peft_model(make_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.default.embedding.weight"}
    trainable_count, total = model.get_nb_trainable_parameters()
    assert trainable_count == 3 * 16 and total > trainable_count
    model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("base_model."))


@pytest.mark.parametrize("kind", MODELS)
def test_mixed_batch_rows_equal_single_adapter_runs(kind):
    model = _ours(kind)
    model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    _perturb(model.prompt_encoder["other"], 7)
    model.eval()
    names = ["default", "other", "other", "default"]
    mixed = _logits(model, input_ids=IDS, attention_mask=MASK, adapter_names=names)
    for row, name in enumerate(names):
        model.set_adapter(name)
        single = _logits(model, input_ids=IDS[row : row + 1], attention_mask=MASK[row : row + 1])
        assert max_abs_diff(mixed[row : row + 1], single) <= TOL, (row, name)
    assert max_abs_diff(mixed[0], mixed[1]) > 1e-3  # the two adapters differ
    kw = dict(max_new_tokens=4, do_sample=False)
    generated = model.generate(input_ids=IDS, attention_mask=MASK, adapter_names=names, **kw)
    for row, name in enumerate(names):
        model.set_adapter(name)
        assert torch.equal(generated[row : row + 1], model.generate(input_ids=IDS[row : row + 1], attention_mask=MASK[row : row + 1], **kw))


@pytest.mark.parametrize("kind", MODELS)
def test_generate_equals_greedy_decoding_through_forward(kind):
    """generate (cached and uncached) == argmax decoding through our own forward, token by token and
    logits within 1e-4 at every step; padded rows and mixed batches (adapter_names) included."""
    model = _ours(kind)
    model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    _perturb(model.prompt_encoder["other"], 7)
    model.eval()
    check_generate_matches_greedy(model, IDS, MASK, max_new_tokens=5)
    check_generate_matches_greedy(model, IDS[:2], max_new_tokens=5)
    check_generate_matches_greedy(model, IDS, MASK, max_new_tokens=5, adapter_names=["other", "default", "default", "other"])


def test_mixed_batch_refusals():
    model = _ours("llama")
    model.add_adapter("longer", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    model.eval()
    with pytest.raises(MixedBatchError, match="same num_virtual_tokens"):
        model(input_ids=IDS[:2], adapter_names=["default", "longer"])
    with pytest.raises(MixedBatchError, match="__base__"):
        model(input_ids=IDS[:2], adapter_names=["default", "__base__"])
    with pytest.raises(MixedBatchError, match="unknown adapter"):
        model(input_ids=IDS[:2], adapter_names=["default", "nope"])
    with pytest.raises(MixedBatchError, match="2 entries but the batch has 4"):
        model(input_ids=IDS, adapter_names=["default", "default"])


def test_adapter_lifecycle():
    model = _ours("llama")
    model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert model.active_adapter == "default" and sorted(model.prompt_encoder) == ["default", "other"]
    model.set_adapter("other")
    assert model.active_adapters == ["other"] and _logits(model, input_ids=IDS).shape[1] == 7
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.prompt_encoder) == ["default"]
    assert list(model.prompt_tokens) == ["default"]
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("other")


def test_position_and_token_type_ids_are_ignored_with_a_warning():
    model = _ours("llama")
    expected = _logits(model, input_ids=IDS)
    with pytest.warns(UserWarning, match="Position ids are not supported"):
        out = _logits(model, input_ids=IDS, position_ids=torch.arange(5).expand(4, 5))
    assert max_abs_diff(out, expected) == 0


def test_text_init_matches_hf(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "classify", "the", "tweet", "as", "a", "complaint"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(tmp_path)
    kw = dict(task_type="CAUSAL_LM", prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the tweet",
              tokenizer_name_or_path=str(tmp_path))
    for n in (2, 7):  # cut and repeated
        ours = get_peft_model(make_model("llama"), PromptTuningConfig(num_virtual_tokens=n, **kw))
        hf = peft.get_peft_model(make_model("llama"), peft.PromptTuningConfig(num_virtual_tokens=n, **kw))
        weight = ours.prompt_encoder["default"].embedding.weight
        assert torch.equal(weight, hf.prompt_encoder["default"].embedding.weight)
        emb = make_model("llama").get_input_embeddings().weight
        assert torch.equal(weight[0], emb[2]) and torch.equal(weight[-1], emb[[2, 3, 4][(n - 1) % 3]])
    sampled = get_peft_model(make_model("llama"), PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    emb = make_model("llama").get_input_embeddings().weight
    rows = sampled.prompt_encoder["default"].embedding.weight
    assert all((emb == row).all(dim=1).any() for row in rows)


def test_config_fields_and_defaults_match_hf():
    import dataclasses

    ours = PromptTuningConfig().to_dict()
    hf = {f.name: f.default for f in dataclasses.fields(peft.PromptTuningConfig)}
    assert set(ours) == set(hf)
    assert ours["prompt_tuning_init"] == "RANDOM" and ours["num_virtual_tokens"] is None
    assert PromptTuningConfig().prompt_tuning_init is PromptTuningInit.RANDOM
    assert peft_kernel.PromptTuningConfig is PromptTuningConfig and peft_kernel.PromptTuningInit is PromptTuningInit
    loaded = PeftConfig.from_dict(peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM").to_dict() | {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "prompt_tuning_init": "RANDOM"})
    assert isinstance(loaded, PromptTuningConfig) and loaded.num_virtual_tokens == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"), "tokenizer_name_or_path can't be None"),
        (dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="x"), "prompt_tuning_init_text can't be None"),
        (dict(tokenizer_kwargs={"a": 1}), "tokenizer_kwargs only valid"),
        (dict(prompt_tuning_init="WORDS"), "prompt_tuning_init must be one of"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PromptTuningConfig(num_virtual_tokens=3, **kwargs)


def test_bad_configs_at_model_build_and_load():
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive int"):
        get_peft_model(make_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match=r"\$.num_virtual_tokens: expected"):
        PeftConfig.from_dict({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": "3"})


def test_listed_by_the_cli(capsys):
    from peft_kernel.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["list-plugins"])
    out = capsys.readouterr().out
    assert "peft-kernel-prompt-tuning" in out and "PROMPT_TUNING" in out


def test_sequence_classification_with_bert_cross_loads_both_ways(tmp_path):
    """SEQ_CLS: the classifier head is a modules_to_save copy, saved as base_model.classifier.*."""
    check_seq_cls_cross_load(lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
                             lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3), tmp_path,
                             saved_keys=["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"])


def test_third_party_method_through_peft_kernel_create_prompt_encoder(isolated_registry):
    """The core mechanism is generic: an inline plugin adds a prompt-learning method with one hook."""
    import types

    import attrs
    from torch import nn

    import peft_kernel_prompt_learning.plugin
    from peft_kernel import hookimpl
    from peft_kernel.records import MethodRecord
    from peft_kernel_prompt_learning import PromptLearningConfig
    from peft_kernel_prompt_learning.learner import PromptEncoder

    @attrs.define(kw_only=True)
    class FixedPromptConfig(PromptLearningConfig):
        peft_type: str = "FIXED_PROMPT"

    class FixedPrompt(PromptEncoder):
        def __init__(self, config):
            super().__init__()
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)

        def forward(self):
            return self.embedding.weight

    calls = []

    @hookimpl
    def peft_kernel_register_methods(register):
        register(MethodRecord(peft_type="FIXED_PROMPT", config_class=FixedPromptConfig, prefix="fixed_prompt_",
                              capabilities={"prompt_learning"}))

    @hookimpl
    def peft_kernel_create_prompt_encoder(config, adapter_name, model, word_embeddings):
        if isinstance(config, FixedPromptConfig):
            calls.append((adapter_name, config.token_dim, config.num_layers))
            return FixedPrompt(config)
        return None

    plugin = types.SimpleNamespace(peft_kernel_register_methods=peft_kernel_register_methods,
                                   peft_kernel_create_prompt_encoder=peft_kernel_create_prompt_encoder)
    isolated_registry(entry_points=[], extra_plugins={"prompt_learning": peft_kernel_prompt_learning.plugin,
                                                      "fixed": plugin})
    model = get_peft_model(make_model("gpt2"), FixedPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert calls == [("default", 16, 2)]
    assert _logits(model, input_ids=IDS).shape == (4, 7, 64)


def test_merge_and_unload_are_clear_errors_for_virtual_tokens():
    model = get_peft_model(make_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    for call in (model.merge_adapter, model.merge_and_unload, model.unload, model.unmerge_adapter):
        with pytest.raises(NotImplementedError, match="virtual tokens instead"):
            call()


def test_state_dict_functions_match_hf():
    peft = pytest.importorskip("peft")
    from peft_kernel import get_peft_model_state_dict, set_peft_model_state_dict

    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ours = get_peft_model(make_model("llama"), PromptTuningConfig(**config))
    theirs = peft.get_peft_model(make_model("llama"), peft.PromptTuningConfig(**config))
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert set(get_peft_model_state_dict(ours)) == set(theirs_sd) == {"prompt_embeddings"}
    set_peft_model_state_dict(ours, theirs_sd)
    torch.testing.assert_close(get_peft_model_state_dict(ours)["prompt_embeddings"], theirs_sd["prompt_embeddings"])


def test_a_family_library_error_is_the_methods_own_not_isolated(isolated_registry, monkeypatch):
    """The prompt-learning family is a requirement of this plugin's distribution: an error it raises
    while hosting a PROMPT_TUNING adapter propagates (with a note naming it) instead of disabling it
    and falling back to the core's tuner."""
    from peft_kernel_prompt_learning.learner import PromptLearner

    registry = isolated_registry()

    def broken(self, adapter_name, config):
        raise RuntimeError("family bug")

    monkeypatch.setattr(PromptLearner, "add_adapter", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PluginWarning: nothing is isolated
        with pytest.raises(RuntimeError, match="family bug") as info:
            get_peft_model(make_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert "raised in peft_kernel_create_host by plugin 'prompt_learning'" in "\n".join(info.value.__notes__)
    assert registry.status_of("prompt_learning").status == "loaded"
