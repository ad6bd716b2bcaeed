"""``peft-kernel finetune``: defaults learn and HF peft loads the result; user data (JSONL, CSV, text),
config files, --peft, resume, other methods; bad input is one clear line."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from peft_kernel.cli import main
from peft_kernel_testing.hf_oracle import hf_peft

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: more CPU threads only add overhead (and contention on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def default_run(one_thread, tmp_path_factory):
    """``peft-kernel finetune`` with nothing but an output folder (and no progress bar)."""
    out = tmp_path_factory.mktemp("finetune") / "out"
    assert main(["finetune", "--output", str(out), "--no-progress"]) == 0
    return out


def test_defaults_learn(default_run, capsys):
    metrics = json.loads((default_run / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["world_size"] == 1 and metrics["model"] == "embedded tiny Llama"
    assert metrics["steps"] and all(isinstance(s["step"], int) and isinstance(s["loss"], float) for s in metrics["steps"])
    before, after = metrics["eval"]["before"]["loss"], metrics["eval"]["after"]["loss"]
    assert after < 0.25 * before, (before, after)  # learns by a clear margin (about 4.3 -> well under 0.5)
    assert metrics["seconds"]["total"] < 120
    assert (default_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = {p.name for p in default_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss.png", "checkpoints", "base_model"} <= files
    assert "model.safetensors" not in files
    for checkpoint in (default_run / "checkpoints").iterdir():  # Trainer checkpoints: adapter-only
        names = {p.name for p in checkpoint.iterdir()}
        assert "adapter_model.safetensors" in names and "optimizer.pt" in names and "model.safetensors" not in names


def test_hf_peft_loads_the_default_adapter_with_equal_outputs(default_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_kernel import AutoPeftModelForCausalLM

    peft = hf_peft()
    config = json.loads((default_run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(default_run / "base_model")
    tokenizer = AutoTokenizer.from_pretrained(default_run)
    ids = tokenizer(["sentiment: the pizza was awful ->", "topic: we loved the race ->"], return_tensors="pt")["input_ids"]
    ours = AutoPeftModelForCausalLM.from_pretrained(str(default_run)).eval()  # base from base_model_name_or_path
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_run / "base_model"), str(default_run)).eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(hf(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    # and it answers: the right label word scores above the other ones
    answers = expected[:, -1].argmax(-1).tolist()
    assert tokenizer.convert_ids_to_tokens(answers) == ["negative", "sport"]


def test_inspect_opens_the_output(default_run, capsys):
    assert main(["inspect", str(default_run)]) == 0
    out = capsys.readouterr().out
    assert "LORA" in out and "lm_head" in out


def _jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_model_and_jsonl_with_config_file_and_resume(default_run, tmp_path):
    """--model (a local folder: the base model the default run saved), JSONL with text and
    prompt/completion rows, IA3 through a YAML config with a peft: section, then --resume."""
    data = _jsonl(tmp_path / "data.jsonl", [
        *({"prompt": f"sentiment: i {w} the pizza ->", "completion": f" {l}"} for w, l in
          [("loved", "positive"), ("hated", "negative"), ("enjoyed", "positive"), ("disliked", "negative")] * 4),
        *({"text": "topic: the match was great -> sport"} for _ in range(4)),
    ])
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {default_run / 'base_model'}\ndata: {data}\nmethod: ia3\nmax-steps: 4\neval_steps: 2\n"
                      "lr: 1e-2\nbatch_size: 4\ngrad-accum: 2\nthreads: 1\n"
                      "peft:\n  target_modules: [k_proj, v_proj, down_proj]\n  feedforward_modules: [down_proj]\n")
    out = tmp_path / "out"
    assert main(["finetune", "--config", str(config), "--output", str(out), "--no-progress", "--eval-split", "0.2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ia3" and metrics["global_step"] == 4 and metrics["eval_examples"] == 4
    assert metrics["options"]["grad_accum"] == 2 and metrics["options"]["eval_split"] == 0.2  # the command line wins
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["down_proj", "k_proj", "v_proj"] or \
        sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    assert not (out / "base_model").exists()  # a user's model is not copied

    # resume from the newest checkpoint of that run and go on to step 6
    assert main(["finetune", "--config", str(config), "--output", str(out), "--no-progress", "--eval-split", "0.2",
                 "--resume", str(out), "--max-steps", "6"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["global_step"] == 6
    assert [s["step"] for s in resumed["steps"]] == [1, 2, 3, 4, 5, 6]
    assert resumed["steps"][:4] == metrics["steps"]  # the history up to the checkpoint comes back with it


@pytest.mark.parametrize("suffix", ["csv", "txt"])
def test_csv_and_plain_text(tmp_path, suffix):
    data = tmp_path / f"data.{suffix}"
    if suffix == "csv":
        data.write_text("prompt,completion,extra\n" + "sentiment: i loved it ->, positive,x\n" * 6)
    else:
        data.write_text("the pizza was great\n\nthe race was dull\n" * 3)
    out = tmp_path / "out"
    assert main(["finetune", "--data", str(data), "--output", str(out), "--max-steps", "2", "--no-progress",
                 "--eval-split", "0", "--peft", "r=2", "--json"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"] == {"before": None, "after": None, "history": []}
    assert metrics["train_examples"] == 6 and metrics["peft_config"]["r"] == 2
    if suffix == "txt":  # a fresh run into the same folder replaces the earlier run's checkpoints
        (out / "checkpoints" / "checkpoint-99").mkdir()
        assert main(["finetune", "--data", str(data), "--output", str(out), "--max-steps", "1", "--no-progress",
                     "--eval-split", "0"]) == 0
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]


# ---- bad input: one line naming the file / key and what is accepted ---------------------------
def _error(capsys, argv: list[str]) -> str:
    assert main(["finetune", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peft-kernel finetune: error: ") and err.count("\n") == 1, err
    return err


def test_data_without_a_usable_field(tmp_path, capsys):
    data = _jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"question": "what?", "answer": "that"}])
    err = _error(capsys, ["--data", str(data)])
    assert f"{data}: line 2: no usable field (found 'question', 'answer')" in err
    assert "'text', or 'prompt' and 'completion'" in err
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("question,answer\na,b\n")
    assert "the CSV header ['question', 'answer'] has no usable column" in _error(capsys, ["--data", str(csv_file)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    assert f"{broken}: line 2 is not valid JSON" in _error(capsys, ["--data", str(broken)])
    assert "no such file" in _error(capsys, ["--data", str(tmp_path / "missing.jsonl")])


def test_method_without_a_plugin(capsys):
    err = _error(capsys, ["--method", "no_such_method"])
    assert "--method no_such_method: no installed plugin provides this method" in err and "Installed methods: " in err and "lora" in err
    err = _error(capsys, ["--method", "lokr", "--max-steps", "0"])
    assert "--max-steps 0: must be greater than 0" in err


def test_unknown_config_keys(tmp_path, capsys):
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"learning_rate": 1e-3}))
    err = _error(capsys, ["--config", str(config)])
    assert f"{config}: learning_rate: unknown option. Accepted keys: " in err and "lr" in err and "peft" in err
    config.write_text(json.dumps({"peft": {"rank": 4}}))
    err = _error(capsys, ["--config", str(config)])
    assert f"{config}: peft: LoraConfig (lora) has no field 'rank'. Its fields: " in err and "lora_alpha" in err
    err = _error(capsys, ["--peft", "lora_rank=4"])
    assert "--peft: LoraConfig (lora) has no field 'lora_rank'" in err
    err = _error(capsys, ["--peft", "r=eight"])
    assert "$.r: expected int" in err
    config.write_text(json.dumps({"lr": [1]}))
    assert "expected a number" in _error(capsys, ["--config", str(config)])
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("epochs: 2\nmethod: [lora\n")
    assert f"--config {yaml_file}: not valid YAML" in _error(capsys, ["--config", str(yaml_file)])


def test_from_adapter_trains_a_saved_adapter_further(default_run, tmp_path, capsys):
    out = tmp_path / "more"
    assert main(["finetune", "--from-adapter", str(default_run), "--output", str(out), "--max-steps", "2",
                 "--eval-split", "0", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["peft_config"]["r"] == 8 and metrics["options"]["from_adapter"] == str(default_run)
    from peft_kernel.peft_weights import load_peft_weights

    start, trained = load_peft_weights(str(default_run), device="cpu"), load_peft_weights(str(out), device="cpu")
    assert start.keys() == trained.keys() and any(not torch.equal(start[k], trained[k]) for k in start)
    capsys.readouterr()
    assert "is a lora adapter, not ia3" in _error(capsys, ["--from-adapter", str(default_run), "--method", "ia3"])
    assert "the saved adapter's config is fixed; drop r" in _error(capsys, ["--from-adapter", str(default_run), "--peft", "r=2"])
    assert "--from-adapter" in _error(capsys, ["--from-adapter", str(tmp_path / "nothing")])
