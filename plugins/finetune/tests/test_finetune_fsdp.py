"""FSDP2 under ``torchrun --nproc_per_node=2`` (gloo, CPU), one launch (``fsdp_driver.py``) for both:
``peft-kernel finetune --fsdp`` trains and saves once; a model sharded with ``shard_peft_model``
saves, from its gathered full state dict, the adapter an unsharded model with those weights has."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from peft_kernel_testing.hf_oracle import hf_peft

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("torch.distributed.checkpoint.state_dict")

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    try:
        from peft_kernel_finetune.fsdp import _fsdp

        _fsdp()
    except ImportError:
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    tmp = tmp_path_factory.mktemp("fsdp")
    shard_out, out, log = tmp / "shard", tmp / "out", tmp / "saves"
    shard_out.mkdir()
    env = {**os.environ, "SAVE_LOG": str(log), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [torchrun, "--nproc_per_node=2", "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
         str(HERE / "fsdp_driver.py"), str(shard_out),
         "finetune", "--fsdp", "--output", str(out), "--max-steps", "6", "--eval-steps", "3", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"shard": shard_out, "out": out, "log": log, "stdout": result.stdout}


def test_finetune_fsdp_two_processes(launch):
    out, log = launch["out"], launch["log"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["rank"] == 0 and metrics["global_step"] == 6 and metrics["fsdp"]
    assert metrics["eval"]["after"]["loss"] < metrics["eval"]["before"]["loss"]
    assert all(s["grad_norm"] > 0 for s in metrics["steps"])
    # sharded by FSDP2, not wrapped in DDP, and both ranks end with the same (gathered) adapter
    trained = [json.loads(pathlib.Path(f"{log}.params.{rank}").read_text()) for rank in (0, 1)]
    assert trained[0] == trained[1] and trained[0]["wrapped"] == "FSDPPeftModelForCausalLM"
    assert launch["stdout"].count("finetune: lora on") == 1
    # each save (2 checkpoints and the final adapter) once, by rank 0; the checkpoints hold no optimizer shard
    assert not pathlib.Path(f"{log}.1").exists()
    saves = [json.loads(line) for line in pathlib.Path(f"{log}.0").read_text().splitlines()]
    finetune_saves = [s for s in saves if pathlib.Path(s["dir"]).is_relative_to(out)]
    assert sorted(pathlib.Path(s["dir"]).name for s in finetune_saves) == ["checkpoint-3", "checkpoint-6", "out"]
    assert not (out / "checkpoints" / "checkpoint-6" / "optimizer.pt").exists()
    # the saved adapter holds the trained weights both ranks gathered
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    lora = [t.double() for k, t in saved.items() if "lora_" in k]  # (it also holds the adapted lm_head's base weight)
    assert abs(sum(float(t.sum()) for t in lora) - trained[0]["sum"]) < 1e-6
    assert abs(sum(float(t.abs().sum()) for t in lora) - trained[0]["abs"]) < 1e-6
    assert (out / "loss.png").is_file()


def test_sharded_save_loads_unsharded(launch):
    """Rank 0's ``save_pretrained(state_dict=<gathered full state dict>)`` loads into fresh unsharded
    models (ours and HF peft) that compute what the gathered weights compute."""
    peft = hf_peft()
    sys.path.insert(0, str(HERE))
    try:
        from fsdp_driver import TARGETS
    finally:
        sys.path.remove(str(HERE))
    from peft_kernel import LoraConfig, PeftModel, get_peft_model
    from peft_kernel_demo.train import build_base_model

    full = torch.load(launch["shard"] / "full.pt")
    reference = get_peft_model(build_base_model(50, seed=0),
                               LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    reference.load_state_dict(full, strict=True)
    lora_b = [v for k, v in full.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # trained: lora_B starts at zero
    folder = str(launch["shard"] / "adapter")
    ours = PeftModel.from_pretrained(build_base_model(50, seed=0), folder)
    hf = peft.PeftModel.from_pretrained(build_base_model(50, seed=0), folder)
    ids = torch.randint(2, 50, (3, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference.eval()(input_ids=ids).logits
        base = build_base_model(50, seed=0)(input_ids=ids).logits
        assert not torch.allclose(expected, base)
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(hf.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_fsdp_errors(tmp_path, capsys):
    """``--fsdp`` with ``--resume``, and ``--fsdp`` without torchrun: one clear line each."""
    from peft_kernel.cli import main

    assert main(["finetune", "--fsdp", "--resume", str(tmp_path), "--output", str(tmp_path / "a")]) != 0
    assert "--fsdp with --resume" in capsys.readouterr().err
    assert main(["finetune", "--fsdp", "--max-steps", "1", "--no-progress", "--output", str(tmp_path / "b")]) != 0
    assert "--fsdp: needs torch.distributed: run under torchrun" in capsys.readouterr().err
