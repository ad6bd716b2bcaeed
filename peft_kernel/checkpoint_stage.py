"""Whole-checkpoint atomic saves: write into a staging folder, then swap it in with one rename.

``save_pretrained`` writes several files (a config and weights per adapter, sub-folders for
non-default adapters). Renaming each file into place keeps every *file* whole, but a crash between
two renames leaves a folder that mixes the new weights with an old config. Here the whole save is
staged instead:

1. ``.<name>.peft-stage-<pid>-<random>`` is created next to the target folder, and every file the
   target already holds is hard-linked into it (copied where links are not possible), so files the
   save does not rewrite (a README, other adapters' sub-folders) survive;
2. the caller writes the new checkpoint into the stage, always by *replacing* files (write a new
   file and rename it over the old name), never by writing into an existing one, which would change
   the live checkpoint through the shared link;
3. every staged file and folder is fsynced, then the stage and the target are exchanged in one
   ``renameat2(RENAME_EXCHANGE)`` call (Linux); where that call is missing, the target is renamed
   aside, the stage renamed in, and the aside copy removed — a crash between those two renames is
   repaired by :func:`recover` (run before every save and every local load), which puts the aside
   copy back.

After a crash the folder is therefore entirely the old checkpoint or entirely the new one, and
leftover stages from killed saves are removed by the next save to the same folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

_STAGE = "peft-stage"
_ASIDE = "peft-aside"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _leftovers(target: Path, kind: str) -> list[Path]:
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}.{kind}-"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


def _pid_alive(path: Path, kind: str) -> bool:
    pid_text = path.name.rsplit(f".{kind}-", 1)[-1].split("-", 1)[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(target: str | os.PathLike) -> None:
    """Repair what a killed save left next to ``target``: restore an aside copy, drop stale stages."""
    target = Path(target)
    for aside in _leftovers(target, _ASIDE):
        if _pid_alive(aside, _ASIDE):
            continue
        if not target.exists():
            os.rename(aside, target)  # killed between the two renames of the fallback swap
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for stage in _leftovers(target, _STAGE):
        if not _pid_alive(stage, _STAGE):
            shutil.rmtree(stage, ignore_errors=True)
    if target.is_dir():
        for stray in target.rglob(".*.tmp"):  # per-file temporaries of older versions
            with contextlib.suppress(OSError):
                stray.unlink()


def _link_tree(source: Path, stage: Path) -> None:
    for root, dirs, files in os.walk(source):
        rel = Path(root).relative_to(source)
        for d in dirs:
            (stage / rel / d).mkdir(exist_ok=True)
        for f in files:
            src, dst = Path(root) / f, stage / rel / f
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                shutil.copy2(src, dst, follow_symlinks=False)


def _fsync_tree(top: Path) -> None:
    for root, _dirs, files in os.walk(top, topdown=False):
        for f in files:
            path = Path(root) / f
            if path.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on folders
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the system offers no such call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _commit(stage: Path, target: Path) -> None:
    if not target.exists():
        os.rename(stage, target)
    elif _exchange(stage, target):
        shutil.rmtree(stage)  # the stage path now holds the old checkpoint
    else:
        aside = _sibling(target, _ASIDE)
        os.rename(target, aside)
        os.rename(stage, target)
        shutil.rmtree(aside)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def staged_checkpoint(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder holding links to ``target``'s files; on success swap it in whole.

    On an exception nothing under ``target`` changes and the stage is removed.
    """
    target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a checkpoint is saved into a folder, and this is a file", str(target))
    recover(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = _sibling(target, _STAGE)
    stage.mkdir()
    try:
        if target.is_dir():
            _link_tree(target, stage)
        yield stage
        _fsync_tree(stage)
        _commit(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
