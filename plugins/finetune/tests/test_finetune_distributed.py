"""``torchrun --nproc_per_node=2 ... finetune``: distributed data parallel over gloo on CPU, the
output written once (rank 0), ``world_size`` 2 in metrics.json."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    out, log = tmp_path / "out", tmp_path / "saves"
    driver = pathlib.Path(__file__).with_name("ddp_driver.py")
    env = {**os.environ, "SAVE_LOG": str(log), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [torchrun, "--nproc_per_node=2", "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
         str(driver), "finetune", "--output", str(out), "--max-steps", "6", "--eval-steps", "3", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["rank"] == 0 and metrics["global_step"] == 6
    assert metrics["parallel_mode"] == "distributed"
    # one model trained together: DDP-wrapped, the same adapter on both ranks after training
    trained = [json.loads(pathlib.Path(f"{log}.params.{rank}").read_text()) for rank in (0, 1)]
    assert trained[0] == trained[1] and trained[0]["wrapped"] == "DistributedDataParallel"
    assert metrics["eval"]["after"]["loss"] < metrics["eval"]["before"]["loss"]
    assert result.stdout.count("finetune: lora on") == 1  # one summary, from rank 0
    # every save (2 checkpoints and the final adapter) was made by rank 0 alone
    assert not pathlib.Path(f"{log}.1").exists()
    saves = [json.loads(line) for line in pathlib.Path(f"{log}.0").read_text().splitlines()]
    assert sorted(pathlib.Path(s["dir"]).name for s in saves) == ["checkpoint-3", "checkpoint-6", "out"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert not [p for p in out.parent.iterdir() if "peft-stage" in p.name]  # no half-written staging folders
