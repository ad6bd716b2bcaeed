"""QEfficient's finetune flags (use_peft, peft_config_file, from_peft_checkpoint...) map onto
`peft-kernel finetune` instead of a second training loop."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from peft_kernel.errors import ConfigError

pytest.importorskip("peft_kernel_finetune", reason="peft-kernel-finetune (the [finetune] extra) is not installed")


def test_options_from_a_qefficient_train_config(tmp_path):
    from peft_kernel_qaic.finetune import DEFAULT_LORA, finetune_options

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    config = SimpleNamespace(model_name="some/model", use_peft=True, peft_method="lora", peft_config_file=None,
                             from_peft_checkpoint="", batch_size_training=2, gradient_accumulation_steps=4, num_epochs=1,
                             max_train_step=0, lr=3e-4, seed=42, context_length=None, output_dir="out",
                             run_validation=False, dataset=str(data))
    options = finetune_options(config)
    assert options == {"model": "some/model", "batch_size": 2, "grad_accum": 4, "epochs": 1, "lr": 3e-4, "seed": 42,
                       "output": "out", "method": "lora", "eval_split": 0.0, "data": str(data),
                       "peft": {k: v for k, v in DEFAULT_LORA.items() if k != "inference_mode"}}
    peft_file = tmp_path / "lora.json"
    peft_file.write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}))
    options = finetune_options({"peft_config_file": str(peft_file), "from_peft_checkpoint": None})
    assert options == {"peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}}
    assert finetune_options({"from_peft_checkpoint": "ckpt", "peft_config_file": str(peft_file)}) == {"from_adapter": "ckpt"}
    with pytest.raises(ConfigError, match="full fine-tuning"):
        finetune_options({"use_peft": False})
    with pytest.raises(ConfigError, match="'alpaca_dataset': QEfficient's named datasets are not bundled"):
        finetune_options({"dataset": "alpaca_dataset"})


def test_run_finetune_then_continue_from_the_checkpoint(tmp_path, capsys):
    """QEfficient's flow on a tiny local model: train with a peft_config_file, then train the saved
    adapter further (from_peft_checkpoint); `python -m peft_kernel_qaic.finetune` takes the same flags."""
    from peft_kernel_finetune.data import bundled_examples
    from peft_kernel_finetune.tiny import embedded_model

    from peft_kernel_qaic.finetune import main, run_finetune

    model, tokenizer = embedded_model(bundled_examples())
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"sentiment: i {w} it ->", "completion": f" {l}"}) + "\n"
                            for w, l in [("loved", "positive"), ("hated", "negative")] * 8))
    peft_file = tmp_path / "lora.yaml"
    peft_file.write_text("r: 4\nlora_alpha: 8\ntarget_modules: [q_proj, v_proj]\nlora_dropout: 0.0\n")
    threads = torch.get_num_threads()
    try:
        metrics = run_finetune({"model_name": str(tmp_path / "model"), "dataset": str(data), "peft_config_file": str(peft_file),
                                "max_train_step": 2, "batch_size_training": 4, "output_dir": str(tmp_path / "first")},
                               no_progress=True, threads=1)
        assert metrics["global_step"] == 2 and metrics["peft_config"]["r"] == 4
        assert main(["--model_name", str(tmp_path / "model"), "--data", str(data), "--from_peft_checkpoint", str(tmp_path / "first"),
                     "--max_train_step", "2", "--run_validation", "false", "--output_dir", str(tmp_path / "second")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "finetune: lora on" in capsys.readouterr().out
    second = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert second["peft_config"]["r"] == 4 and second["eval"]["before"] is None
    assert json.loads((tmp_path / "second" / "adapter_config.json").read_text())["target_modules"] in (["q_proj", "v_proj"], ["v_proj", "q_proj"])
    assert main(["--use_peft", "false"]) == 1
    assert "full fine-tuning" in capsys.readouterr().err
