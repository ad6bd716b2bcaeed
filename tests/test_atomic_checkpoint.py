"""A save is all-or-nothing for the whole checkpoint, even when the saving process is killed."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from peft_kernel import LoraConfig, PeftModel, get_peft_model
from peft_kernel import checkpoint_stage
from peft_kernel.checkpoint_stage import recover, staged_checkpoint


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(64, 64)
        self.lin1 = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _model(seed: int, r: int) -> PeftModel:
    torch.manual_seed(seed)
    model = get_peft_model(_MLP(), LoraConfig(r=r, target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=r + 1, target_modules=["lin0"], init_lora_weights=False))
    return model


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    found = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    found += [str(p) for p in (parent / name).rglob("*.tmp")] if (parent / name).exists() else []
    return found


def test_killed_saves_leave_the_old_or_the_new_checkpoint(tmp_path: Path) -> None:
    old_model, new_model = _model(0, 4), _model(1, 6)
    old_model.save_pretrained(tmp_path / "old")
    new_model.save_pretrained(tmp_path / "new")
    old, new = _files(tmp_path / "old"), _files(tmp_path / "new")
    assert old.keys() == new.keys() and all(old[k] != new[k] for k in old)  # every file tells them apart

    target = tmp_path / "ckpt"
    started = time.perf_counter()
    new_model.save_pretrained(target)
    one_save = time.perf_counter() - started
    rng = random.Random(1234)
    outcomes = {"old": 0, "new": 0, "mixed": 0}
    for attempt in range(30):
        old_model.save_pretrained(target)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child saves the new checkpoint over and over until it is killed
            try:
                os.close(read_end)
                os.write(write_end, b"s")  # started
                while True:
                    new_model.save_pretrained(target)
                    os.write(write_end, b"d")  # a save done
            finally:
                os._exit(0)
        os.close(write_end)
        os.read(read_end, 1)
        if attempt % 2:  # half the kills after a first complete save, so a loaded machine still sees both outcomes
            os.read(read_end, 1)
        time.sleep(rng.uniform(0.0, one_save))  # then anywhere in the next save
        os.kill(pid, signal.SIGKILL)
        os.close(read_end)
        os.waitpid(pid, 0)
        recover(target)
        seen = _files(target)
        outcomes["old" if seen == old else "new" if seen == new else "mixed"] += 1
    assert outcomes["mixed"] == 0, outcomes
    assert outcomes["old"] and outcomes["new"], f"the kills missed the save window: {outcomes}"

    new_model.save_pretrained(target)  # the next save clears what killed saves left behind
    assert _leftovers(tmp_path, "ckpt") == []
    assert _files(target) == new
    torch.manual_seed(1)  # new_model's base
    loaded = PeftModel.from_pretrained(_MLP(), target)
    x = torch.randn(3, 64)
    assert torch.allclose(loaded(x), new_model(x), atol=1e-6)


def test_a_failed_save_changes_nothing(tmp_path: Path) -> None:
    model = _model(0, 4)
    model.save_pretrained(tmp_path / "ckpt")
    before = _files(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with staged_checkpoint(tmp_path / "ckpt") as stage:
            (stage / "adapter_config.json").unlink()
            (stage / "adapter_config.json").write_text("{}")
            raise RuntimeError("disk on fire")
    assert _files(tmp_path / "ckpt") == before
    assert _leftovers(tmp_path, "ckpt") == []


def test_files_the_save_does_not_write_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "README.md").write_text("my notes")
    _model(0, 4).save_pretrained(target)
    _model(1, 6).save_pretrained(target, selected_adapters=["default"])
    assert (target / "README.md").read_text() == "my notes"
    assert (target / "other" / "adapter_config.json").is_file()  # not selected, so left as it was


def test_fallback_swap_killed_between_its_renames_is_repaired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without renameat2 the swap is two renames; a crash between them leaves the old copy aside."""
    target = tmp_path / "ckpt"
    _model(0, 4).save_pretrained(target)
    before = _files(target)
    monkeypatch.setattr(checkpoint_stage, "_exchange", lambda a, b: False)
    monkeypatch.setattr(checkpoint_stage, "_pid_alive", lambda path, kind: False)
    real_rename = os.rename
    calls: list[tuple[str, str]] = []

    def crash_on_second_rename(src: str, dst: str) -> None:
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint_stage.os, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _model(1, 6).save_pretrained(target)
    monkeypatch.setattr(checkpoint_stage.os, "rename", real_rename)
    assert not target.exists()  # the state a real crash at that point leaves
    recover(target)
    assert _files(target) == before
    assert _leftovers(tmp_path, "ckpt") == []


def test_save_into_a_file_is_refused_before_writing(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.write_text("not a folder")
    with pytest.raises((NotADirectoryError, ValueError)):
        _model(0, 4).save_pretrained(target)
    assert target.read_text() == "not a folder"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
