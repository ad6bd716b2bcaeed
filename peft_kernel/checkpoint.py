"""Adapter checkpoints in HF PEFT's format: files, Hub resolution, atomic writes.

A saved adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``; the
``"default"`` adapter lives at the root of ``save_pretrained``'s folder, any other in a sub-folder
named after it. Writes go to a temporary file in the same folder and are renamed into place, so an
interrupted save never replaces a good file with half of one. Pickled ``adapter_model.bin`` files
are read only with ``allow_pickle=True``, and then still with ``weights_only=True``: tensors in a
dict, never arbitrary objects.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from peft_kernel.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover - annotations only; torch is imported where tensors are written or read
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666`` less the umask (0644 usually)."""
    return 0o666 & ~_umask()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; the saved file gets a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_write(Path(path), write)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], safe_serialization: bool = True) -> None:
    import torch
    from safetensors.torch import save_file

    clean = {k: own_storage(v.detach()).cpu() for k, v in tensors.items()}
    if safe_serialization:
        clean = _untie(clean)
        _atomic_write(Path(path), lambda tmp: save_file(clean, tmp, metadata={"format": "pt"}))
    else:
        _atomic_write(Path(path), lambda tmp: torch.save(clean, tmp))


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it is contiguous and its storage holds nothing else, else a contiguous copy.

    A view into a larger storage (a slice of a bigger tensor: a method that keeps several adapters'
    weights in one block) would make ``torch.save`` write the whole block, and a file or state dict
    holding it would alias the model's other tensors; a copy holds exactly its own values."""
    import torch

    if tensor.is_contiguous() and tensor.storage_offset() == 0 and \
            tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory; clone the second and later ones."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in tensors.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone() if ident in seen else value
        seen.add(ident)
    return out


def resolve_file(
    path_or_id: str | os.PathLike,
    filename: str,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    missing_ok: bool = False,
) -> Path | None:
    """``filename`` inside a local folder or a Hub repo (downloaded, or from the cache offline)."""
    local = Path(path_or_id) / (subfolder or "")
    if Path(path_or_id).is_dir():
        candidate = local / filename
        if candidate.is_file():
            return candidate
        if missing_ok:
            return None
        raise CheckpointError(f"{candidate} does not exist: is {path_or_id!s} a saved adapter folder?")
    text = str(path_or_id)
    if Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        if missing_ok:
            return None
        raise CheckpointError(f"{text} is not a local folder (it does not exist), and it is not a Hub repo id either.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            hf_hub_download(
                str(path_or_id), filename, subfolder=subfolder or None, revision=revision,
                cache_dir=cache_dir, token=token, local_files_only=bool(local_files_only),
            )
        )
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError) as exc:
        if missing_ok and isinstance(exc, EntryNotFoundError):
            return None
        raise CheckpointError(
            f"cannot find {filename!r} for {path_or_id!s}"
            f"{f' (subfolder {subfolder!r})' if subfolder else ''}: not a local folder, and the Hub "
            f"(or its offline cache) has no such file: {type(exc).__name__}"
        ) from None
    except Exception as exc:
        if missing_ok:
            return None
        raise CheckpointError(f"cannot fetch {filename!r} for {path_or_id!s}: {type(exc).__name__}: {exc}") from None


def load_adapter_weights(
    path_or_id: str | os.PathLike,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    **hub_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (or, with ``allow_pickle=True``, ``adapter_model.bin``)."""
    path = resolve_file(path_or_id, WEIGHTS_NAME, subfolder=subfolder, missing_ok=True, **hub_kwargs)
    if path is None:
        pickle_path = resolve_file(path_or_id, PICKLE_WEIGHTS_NAME, subfolder=subfolder, missing_ok=True, **hub_kwargs)
        if pickle_path is None:
            raise CheckpointError(f"no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) found for {path_or_id!s}")
        if not allow_pickle:
            raise CheckpointError(
                f"{pickle_path} is a pickle file, which can run arbitrary code when loaded. Pass "
                "allow_pickle=True if you trust its source, or re-save it as safetensors."
            )
        return read_pickle(pickle_path, device)
    return read_safetensors(path, device)


def read_pickle(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A pickled state dict, read with ``weights_only=True`` even when pickles are allowed: a pickle
    that needs anything but tensors and plain containers (a class, a function: code) is refused."""
    import pickle
    import struct

    import torch

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError, IndexError,
            KeyError, OverflowError, struct.error, ImportError, RecursionError) as exc:  # malformed or hostile bytes
        raise CheckpointError(
            f"{path} cannot be read as a plain pickled state dict with weights_only=True "
            f"({type(exc).__name__}: {_unpickling_reason(exc)}). peft-kernel never unpickles arbitrary objects, "
            "even with allow_pickle=True; re-save the adapter as safetensors where it was made."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(
            f"{path} does not hold a state dict (a dict of names to tensors) but {type(state).__name__}; "
            "it is not an adapter checkpoint."
        )
    return state


def _unpickling_reason(exc: BaseException) -> str:
    """The informative line of ``torch.load``'s long weights_only message (the blocked global...)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return (specific or lines or [type(exc).__name__])[-1]


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is corrupt or "
            "truncated. Re-download it or save the adapter again."
        ) from None


def adapter_dir(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    """Where ``save_pretrained`` writes an adapter: the root for ``"default"``, else a sub-folder."""
    return Path(save_directory) if adapter_name == "default" else Path(save_directory) / adapter_name


def check_save_target(save_directory: str | os.PathLike, adapter_names: list[str]) -> None:
    """Refuse, before anything is written, a save that could only fail half-way: a ``save_directory``
    (or an adapter's sub-folder, or a folder above them) that exists as a file, a file to write that
    exists as a folder, or a folder that cannot be written to."""

    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"save_directory {root} is a file; pass a folder.")
    for name in adapter_names:
        folder = adapter_dir(root, name)
        for part in [folder, *folder.parents]:
            if part.exists():
                if not part.is_dir():
                    raise CheckpointError(
                        f"cannot save adapter {name!r} into {folder}: {part} is a file, not a folder. Nothing was written."
                    )
                if not os.access(part, os.W_OK | os.X_OK):
                    raise CheckpointError(f"cannot save adapter {name!r}: {part} is not writable. Nothing was written.")
                break
        for filename in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            if (folder / filename).is_dir():
                raise CheckpointError(
                    f"cannot save adapter {name!r}: {folder / filename} is a folder. Nothing was written."
                )
