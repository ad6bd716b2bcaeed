"""``peft-kernel demo`` smoke test: adapters really learn, mixed batch == single-adapter runs."""

from __future__ import annotations

import json

import pytest

from peft_kernel.cli import main
from peft_kernel_demo.tasks import WordTokenizer, load_tasks


def test_bundled_tasks_are_well_formed():
    tasks = load_tasks()
    assert set(tasks) == {"sentiment", "topic"}
    assert tasks["sentiment"].labels == ("negative", "positive")
    assert tasks["topic"].labels == ("food", "music", "sport", "weather")
    for task in tasks.values():
        assert len(task.train) > 200 and len(task.test) == 64
        assert not {e.text for e in task.test} & {e.text for e in task.train}, "test sentences leak into training"
    tokenizer = WordTokenizer.for_tasks(tasks.values())
    ids, last = tokenizer.batch(["the pizza was great", "i hated the rain"])
    assert ids.shape == (2, 6) and last.tolist() == [5, 5]
    assert tokenizer.vocab[ids[0, 5]] == "->" and tokenizer.vocab[ids[0, 2]] == "pizza"


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
    from peft_kernel_demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return run_demo(steps=80, seed=0, output_dir=out / "adapters", progress=False)


def test_demo_adapters_learn(demo_result):
    rows = {(r["task"], r["adapter"]): r for r in demo_result["results"]}
    assert set(rows) == {("sentiment", "sentiment"), ("sentiment", "__base__"), ("topic", "topic"), ("topic", "__base__")}
    for task in ("sentiment", "topic"):
        trained, base = rows[task, task], rows[task, "__base__"]
        assert trained["before"] <= trained["chance"] + 0.2, "untrained adapter should be near chance"
        assert trained["after_single"] >= trained["before"] + 0.25, f"{task} adapter did not learn: {trained}"
        assert trained["after_single"] >= 0.7
        # base rows are untouched by training and by the other rows of the batch
        assert base["after_mixed"] == base["after_single"] == base["before"]


def test_demo_mixed_batch_matches_single_adapter_runs(demo_result):
    for row in demo_result["results"]:
        assert row["after_mixed"] == row["after_single"]
    assert demo_result["max_abs_logit_diff_mixed_vs_single"] < 1e-4
    assert demo_result["mixed_batch_rows"] == 4 * 64


def test_demo_saves_hf_format(demo_result):
    from pathlib import Path

    out = Path(demo_result["output_dir"])
    for name in ("sentiment", "topic"):
        assert (out / name / "adapter_model.safetensors").is_file()
        config = json.loads((out / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 8


def test_demo_saved_adapters_load_in_hf_peft(demo_result):
    """The demo's adapters are HF PEFT checkpoints: HF PEFT loads them onto the same base model."""
    peft = pytest.importorskip("peft")
    import torch
    from pathlib import Path

    from peft_kernel import PeftModel
    from peft_kernel_demo.train import build_base_model

    tokenizer = WordTokenizer.for_tasks(load_tasks().values())
    out = Path(demo_result["output_dir"])
    ids, _ = tokenizer.batch(["the pizza was great", "i hated the rain"])
    theirs = peft.PeftModel.from_pretrained(build_base_model(len(tokenizer), 0), str(out / "topic")).eval()
    mine = PeftModel.from_pretrained(build_base_model(len(tokenizer), 0), out / "topic").eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_demo_cli_json(tmp_path, capsys):
    code = main(["demo", "--steps", "3", "--output-dir", str(tmp_path / "out"), "--no-progress", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 3 and len(result["results"]) == 4
    assert (tmp_path / "out" / "sentiment" / "adapter_config.json").is_file()


def test_demo_rejects_bad_steps(capsys):
    code = main(["demo", "--steps", "0"])
    assert code == 1 and "--steps must be at least 1" in capsys.readouterr().err


def test_demo_cli_table(tmp_path, capsys):
    code = main(["demo", "--steps", "2", "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "task       adapter    chance  before training  after: mixed batch  after: adapter alone" in out
    assert "sentiment  sentiment" in out and "topic      __base__" in out
    assert "max |logit difference|" in out
