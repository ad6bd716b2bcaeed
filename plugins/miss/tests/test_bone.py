"""Bone checkpoints (HF PEFT <= 0.20; 0.21 dropped Bone) load as MiSS adapters with MiSS's outputs.

The checkpoints are written by hand in the format HF PEFT 0.18 wrote (checked against it once):
``adapter_config.json`` with ``peft_type: "BONE"`` and BoneConfig's fields (no ``miss_dropout`` or
``mini_r``), tensors under ``<module>.bone_block``.
"""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_kernel import PeftConfig, PeftModel, get_peft_model
from peft_kernel_testing import perturb, run
from peft_kernel_testing.models import make_inputs, make_model
from peft_kernel_miss import BoneConfig, MissConfig

BONE_FIELDS = ("auto_mapping", "base_model_name_or_path", "bias", "exclude_modules", "inference_mode",
               "init_weights", "layers_pattern", "layers_to_transform", "modules_to_save", "peft_type",
               "peft_version", "r", "revision", "target_modules", "task_type")


def _bone_checkpoint(miss_folder: Path, bone_folder: Path) -> None:
    """Rewrite a saved MiSS adapter as HF PEFT <= 0.20 saved the same Bone adapter."""
    config = json.loads((miss_folder / "adapter_config.json").read_text())
    bone = {key: config[key] for key in BONE_FIELDS}
    bone.update(peft_type="BONE", peft_version="0.18.0")
    bone_folder.mkdir()
    (bone_folder / "adapter_config.json").write_text(json.dumps(bone, indent=2, sort_keys=True))
    tensors = load_file(miss_folder / "adapter_model.safetensors")
    assert tensors and all(key.endswith(".miss_block") for key in tensors)
    save_file({key.replace(".miss_block", ".bone_block"): value for key, value in tensors.items()},
              bone_folder / "adapter_model.safetensors")


@pytest.mark.parametrize("kind,config", [
    ("mlp", dict(r=4, target_modules=["lin0", "lin1"])),
    ("mlp", dict(r=4, target_modules=["lin1"], init_weights="bat")),
    ("llama", dict(r=4, init_weights=False)),
])
def test_bone_checkpoint_loads_as_the_miss_adapter(kind, config):
    miss = get_peft_model(make_model(kind), MissConfig(**config))
    perturb(miss, 0)
    inputs = make_inputs(kind)
    expected = run(miss.eval(), inputs)
    with tempfile.TemporaryDirectory() as tmp:
        miss.save_pretrained(Path(tmp, "miss"))
        _bone_checkpoint(Path(tmp, "miss"), Path(tmp, "bone"))
        assert isinstance(PeftConfig.from_pretrained(Path(tmp, "bone")), MissConfig)
        loaded = PeftModel.from_pretrained(make_model(kind), Path(tmp, "bone"))
        got = run(loaded, inputs)
        assert torch.equal(got, expected)
        # as HF's conversion script: once loaded, the adapter is MiSS and saves as MiSS
        loaded.save_pretrained(Path(tmp, "converted"))
        saved = json.loads(Path(tmp, "converted", "adapter_config.json").read_text())
        assert saved["peft_type"] == "MISS" and saved["init_weights"] == config.get("init_weights", True)
        keys = load_file(Path(tmp, "converted", "adapter_model.safetensors")).keys()
        assert keys == load_file(Path(tmp, "miss", "adapter_model.safetensors")).keys()
    peft = pytest.importorskip("peft")
    with tempfile.TemporaryDirectory() as tmp:
        loaded.save_pretrained(tmp)
        hf = peft.PeftModel.from_pretrained(make_model(kind), tmp).eval()
        torch.testing.assert_close(run(hf, inputs), expected, atol=1e-5, rtol=0)


def test_bone_config_is_built_as_miss_config():
    config = BoneConfig(r=8, init_weights="bat", target_modules=["q_proj"])
    assert type(config) is MissConfig
    assert config == MissConfig(r=8, init_weights="bat", target_modules=["q_proj"])
    from_json = PeftConfig.from_dict({"peft_type": "BONE", "r": 8, "init_weights": "bat", "target_modules": ["q_proj"]})
    assert from_json == config


def test_bone_config_keeps_its_own_field_checks():
    """Bone had no 'mini' variant: a Bone config asking for it is malformed."""
    from peft_kernel import ConfigError

    with pytest.raises(ConfigError, match="init_weights"):
        PeftConfig.from_dict({"peft_type": "BONE", "init_weights": "mini"})
    with pytest.raises(ConfigError, match=r"\$\.r must be"):
        PeftConfig.from_dict({"peft_type": "BONE", "r": 0})
