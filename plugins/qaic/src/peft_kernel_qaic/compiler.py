"""The Cloud AI 100 compiler (``qaic-exec``): command line, and running it when the SDK is there.

:func:`build_compile_command` is pure (unit-tested without the SDK). :func:`run_compiler` looks
for the binary (``$PEFT_KERNEL_QAIC_EXEC``, else ``/opt/qti-aic/exec/qaic-exec``) and raises
:class:`~peft_kernel_qaic.errors.SDKNotFoundError` naming what is missing, and that
``runtime="onnxruntime"`` runs the same graph on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from peft_kernel_qaic.errors import ExportConfigError, SDKNotFoundError

DEFAULT_QAIC_EXEC = "/opt/qti-aic/exec/qaic-exec"


def qaic_exec_path() -> str:
    return os.environ.get("PEFT_KERNEL_QAIC_EXEC", DEFAULT_QAIC_EXEC)


def mdp_config(num_devices: int, num_cores: int) -> dict:
    """A multi-device partition config: one partition across ``num_devices`` cards (tensor slicing)."""
    return {
        "connections": [{"devices": list(range(num_devices)), "type": "p2p"}],
        "partitions": [
            {
                "name": "Partition0",
                "devices": [{"deviceId": d, "numCores": num_cores} for d in range(num_devices)],
            }
        ],
    }


def build_compile_command(
    onnx_path: str | os.PathLike,
    qpc_dir: str | os.PathLike,
    specializations_path: str | os.PathLike,
    custom_io_path: str | os.PathLike | None = None,
    *,
    num_cores: int = 16,
    convert_to_fp16: bool = True,
    mxfp6_matmul: bool = False,
    mxint8_kv_cache: bool = False,
    mos: int | None = None,
    ols: int | None = None,
    aic_enable_depth_first: bool = False,
    mdp_config_path: str | os.PathLike | None = None,
    aic_hw_version: str = "2.0",
    extra_args: Sequence[str] = (),
    qaic_exec: str | None = None,
) -> list[str]:
    """The ``qaic-exec`` argument vector that compiles ``onnx_path`` into a QPC in ``qpc_dir``."""
    if not isinstance(num_cores, int) or not 1 <= num_cores <= 16:
        raise ExportConfigError(f"num_cores must be an integer from 1 to 16 (cores per Cloud AI 100 SoC), got {num_cores!r}")
    if mxint8_kv_cache and not convert_to_fp16:
        raise ExportConfigError("mxint8_kv_cache needs convert_to_fp16=True")
    cmd = [
        qaic_exec or qaic_exec_path(),
        f"-m={onnx_path}",
        "-aic-hw",
        f"-aic-hw-version={aic_hw_version}",
        f"-network-specialization-config={specializations_path}",
        "-retained-state",
        f"-aic-num-cores={num_cores}",
        f"-aic-binary-dir={qpc_dir}",
        "-compile-only",
    ]
    if convert_to_fp16:
        cmd.append("-convert-to-fp16")
    if custom_io_path is not None:
        cmd.append(f"-custom-IO-list-file={custom_io_path}")
    if mxfp6_matmul:
        cmd.append("-mxfp6-matmul")
    if mos is not None:
        cmd.append(f"-mos={mos}")
    if ols is not None:
        cmd.append(f"-ols={ols}")
    if aic_enable_depth_first:
        cmd.append("-aic-enable-depth-first")
    if mdp_config_path is not None:
        cmd.append(f"-mdp-load-partition-config={mdp_config_path}")
    cmd += list(extra_args)
    return cmd


def require_sdk(qaic_exec: str | None = None) -> str:
    exe = qaic_exec or qaic_exec_path()
    if not (Path(exe).is_file() and os.access(exe, os.X_OK)) and shutil.which(exe) is None:
        raise SDKNotFoundError(
            f"cannot compile for Cloud AI 100: the compiler {exe} was not found (install the Qualcomm Cloud AI "
            "100 Apps and Platform SDKs, or point PEFT_KERNEL_QAIC_EXEC at qaic-exec). The exported ONNX graph "
            "is ready; without the card, generate(..., runtime='onnxruntime') runs that same graph on CPU."
        )
    return exe


def write_mdp_config(folder: Path, num_devices: int, num_cores: int) -> Path:
    path = folder / "mdp_config.json"
    path.write_text(json.dumps(mdp_config(num_devices, num_cores), indent=2))
    return path


def run_compiler(cmd: Sequence[str], log_path: Path) -> None:
    require_sdk(cmd[0])
    with open(log_path, "w") as log:
        proc = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"qaic-exec failed with exit code {proc.returncode}; command: {' '.join(cmd)}\n{tail}")
