"""Every bad input gets a named error (a peft-kernel error class, with the field or file), raised
before anything is built or written; probes found by fuzzing, kept as regression tests."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import re

import pytest
import torch

from peft_kernel import (
    IA3Config, LoraConfig, OFTConfig, PeftConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model,
)
from peft_kernel.errors import AdapterNameError, CheckpointError, ConfigError, UnsupportedFeatureError
from peft_kernel_testing import make_inputs, make_model


def write_config(folder, text: str | bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def lora_json(**fields) -> str:
    data = LoraConfig(target_modules=["lin0"]).to_dict()
    data.update(fields)
    return json.dumps(data)


# ---- adapter_config.json files ---------------------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ("[1, 2]", r"\$: expected a JSON object, got list"),
    ('"LORA"', r"expected a JSON object, got str"),
    ("null", r"expected a JSON object, got NoneType"),
    (b'{"peft_type": "LORA", "r": 8\xff}', r"is not UTF-8 text"),
    (b"\xff\xfe{\x00}\x00", r"is not UTF-8 text"),
    ("[" * 100_000 + "]" * 100_000, r"nests JSON arrays or objects too deeply"),
    ('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}", r"not a usable JSON config: Exceeds the limit"),
    ('{"peft_type": 3}', r"\$.peft_type: expected the name of a PEFT method, got 3"),
])
def test_unreadable_config_files(tmp_path, text, match):
    write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        PeftConfig.from_pretrained(tmp_path)
    assert "adapter_config.json" in str(info.value)


def test_deep_nesting_inside_a_field(tmp_path):
    nested = "lin0"
    for _ in range(500):
        nested = [nested]
    data = json.loads(lora_json())
    data["eva_config"] = nested  # a field typed Any
    with pytest.raises(ConfigError, match=r"\$.eva_config: nested more than 32 levels deep"):
        PeftConfig.from_dict(data)


def test_wrong_types_in_direct_construction():
    with pytest.raises(ConfigError, match=r"\$.r: expected int, got str '8'"):
        LoraConfig(r="8")
    with pytest.raises(ConfigError, match=r"\$.lora_alpha: NaN and infinity"):
        LoraConfig(lora_alpha=float("nan"))
    with pytest.raises(ConfigError, match=r"\$.rank_pattern: item \['q'\]: expected int, got str"):
        LoraConfig(rank_pattern={"q": "4"})
    with pytest.raises(ConfigError, match=r"\$.target_modules"):
        IA3Config(target_modules=["lin0", 3])
    assert LoraConfig(lora_dropout=0, target_modules=("lin0",)).lora_dropout == 0  # ints stand for floats, tuples for lists


# ---- regexes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, field", [
    (lambda: LoraConfig(target_modules="lin(0"), "LoraConfig.target_modules"),
    (lambda: LoraConfig(target_modules=["lin0"], exclude_modules="[a-"), "LoraConfig.exclude_modules"),
    (lambda: LoraConfig(target_modules=["lin0"], layers_pattern="(", layers_to_transform=[0]), "LoraConfig.layers_pattern"),
    (lambda: LoraConfig(target_modules=["lin0"], rank_pattern={"*": 2}), "LoraConfig.rank_pattern key"),
    (lambda: LoraConfig(target_modules=["lin0"], alpha_pattern={"a{2,1}": 2}), "LoraConfig.alpha_pattern key"),
    (lambda: IA3Config(target_modules=["lin0"], feedforward_modules="(?P<x>"), "IA3Config.feedforward_modules"),
    (lambda: OFTConfig(target_modules="\\", oft_block_size=0, r=2), "OFTConfig.target_modules"),
])
def test_invalid_regexes_fail_when_the_config_is_made(make, field):
    with pytest.raises(ConfigError, match=rf"{field}: .* is not a valid regular expression"):
        make()


def test_invalid_regex_set_after_construction_is_named_at_injection():
    config = LoraConfig(target_modules=["lin0"])
    config.target_modules = "lin("
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        get_peft_model(make_model("mlp"), config)


# ---- sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: LoraConfig(r=2**31), r"LoraConfig: \$.r must be an integer from 1 to 65,536, got 2147483648"),
    (lambda: LoraConfig(rank_pattern={"lin0": 0}), r"rank_pattern\['lin0'\] must be an integer from 1"),
    (lambda: LoraConfig(rank_pattern={"lin0": -3}), r"rank_pattern\['lin0'\]"),
    (lambda: PromptTuningConfig(num_virtual_tokens=10**30), r"num_virtual_tokens must be .*an integer of 31 digits"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=2**40), r"encoder_hidden_size must be"),
    (lambda: OFTConfig(num_cayley_neumann_terms=10**30), r"num_cayley_neumann_terms must be an integer from 0 to 100"),
    (lambda: OFTConfig(r=0, oft_block_size=2**20), r"oft_block_size must be an integer from 0 to 65,536"),
    (lambda: PromptTuningConfig(num_virtual_tokens=4, num_transformer_submodules=3), r"num_transformer_submodules"),
])
def test_sizes_are_bounded(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


@pytest.mark.parametrize("fields, match", [
    (dict(num_attention_heads=4, token_dim=15), r"token_dim 15 cannot be split into num_attention_heads 4"),
    (dict(num_attention_heads=3), r"num_attention_heads=2 x 5 \(token_dim=10\) does not fit"),
    (dict(num_attention_heads=4, token_dim=16), r"does not fit the model's key/value cache of 2 heads x 4"),
    (dict(num_layers=5), r"num_layers is 5 but the model has 2 layers"),
])
def test_prefix_that_does_not_fit_the_model_fails_at_creation(fields, match):
    model = make_model("llama")  # 4 attention heads, 2 key/value heads of 4
    with pytest.raises(ConfigError, match=match):
        get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **fields))


def test_prefix_that_does_not_fit_a_loaded_adapter_fails_at_load(tmp_path):
    peft = get_peft_model(make_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    peft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(num_attention_heads=8, token_dim=16)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="does not fit the model's key/value cache"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_prompt_width_that_does_not_fit_the_embeddings():
    with pytest.raises(ConfigError, match="token_dim is 24 but the model's input embeddings are 16 wide"):
        get_peft_model(make_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, token_dim=24))


def test_unsupported_fields_raise_a_named_error():
    with pytest.raises(UnsupportedFeatureError, match=r"does not implement megatron_config") as info:
        get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"], megatron_config={"tensor_model_parallel_size": 2}))
    assert isinstance(info.value, NotImplementedError)  # still what HF-minded code catches


# ---- adapter names and saving --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["evil\n", "a.b", "", "x" * 129])
def test_bad_adapter_names(name):
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(AdapterNameError):
        model.add_adapter(name, LoraConfig(target_modules=["lin0"]))
    assert list(model.peft_config) == ["default"]


def test_long_name_is_refused_before_any_write(tmp_path):
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"]))
    model.add_adapter("x" * 128, LoraConfig(target_modules=["lin0"]))  # the longest allowed saves fine
    model.save_pretrained(tmp_path)
    assert (tmp_path / ("x" * 128) / "adapter_model.safetensors").is_file()
    with pytest.raises(AdapterNameError, match="300 characters long; use at most 128"):
        PeftModel.from_pretrained(make_model("mlp"), tmp_path, adapter_name="y" * 300)


def test_save_into_a_file_or_over_a_file_subfolder_writes_nothing(tmp_path):
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin1"]))
    target = tmp_path / "file"
    target.write_text("not a folder")
    with pytest.raises(CheckpointError, match="is a file; pass a folder"):
        model.save_pretrained(target)
    with pytest.raises(CheckpointError, match="file is a file, not a folder. Nothing was written"):
        model.save_pretrained(target / "below")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "other").write_text("a file where the sub-folder goes")
    with pytest.raises(CheckpointError, match=r"cannot save adapter 'other' .* is a file, not a folder. Nothing was written"):
        model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["other"]  # the default adapter was not written either
    (folder / "other").unlink()
    (folder / "adapter_model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is a folder"):
        model.save_pretrained(folder)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_a_normal_files_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"])).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


# ---- pickles ------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [
    b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.junk",  # torch's legacy magic number, then garbage
    b"cos\nsystem\n(S'echo hi'\ntR.",  # a classic malicious pickle
    b"\x80\x02\xff.",
    b"",
])
def test_malformed_or_hostile_pickles_raise_checkpoint_errors(tmp_path, payload):
    get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0"])).save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(CheckpointError, match="adapter_model.bin"):
        PeftModel.from_pretrained(make_model("mlp"), tmp_path, allow_pickle=True)


# ---- the CLI ------------------------------------------------------------------------------------
def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    get_peft_model(make_model("mlp"), LoraConfig(target_modules=["lin0", "lin1"])).save_pretrained(tmp_path)
    command = [sys.executable, "-m", "peft_kernel.cli", "inspect", str(tmp_path), "--tensors"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.close()  # the reader is gone before the first line (`| head -0`)
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 141
    assert stderr == ""


def test_a_working_adapter_still_works():
    """The checks above do not refuse what HF PEFT accepts."""
    model = get_peft_model(make_model("mlp"), LoraConfig(target_modules="lin[01]", rank_pattern={"lin1": 2},
                                                         alpha_pattern={r"lin\d": 4}, exclude_modules=["lin2"]))
    assert model.base_model.model.lin1.lora_A["default"].weight.shape[0] == 2
    model(**make_inputs("mlp"))
    torch.testing.assert_close(model(**make_inputs("mlp")), model(**make_inputs("mlp")))


@pytest.mark.parametrize("name, content, message", [
    ("s.yaml", b"a: [1,\n", "not valid YAML"),
    ("s.json", b"{not json", "not valid JSON"),
    ("s.json", b"\xff\xfe", "not UTF-8 text"),
    ("s.json", b"[1, 2]", "expected a mapping"),
    ("s.toml", b"a = 1", "the file must end in"),
])
def test_settings_files_give_named_errors(tmp_path, name, content, message):
    """Training and export settings files (finetune's --config, qaic's peft_config_file) share one reader."""
    from peft_kernel.config import read_settings_file
    from peft_kernel_qaic.finetune import load_peft_config_file

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(f"peft_config_file {path}: {message}")):
        load_peft_config_file(path)
    with pytest.raises(ConfigError, match=message):
        read_settings_file(path, "settings")
