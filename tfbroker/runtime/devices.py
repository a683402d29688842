"""Which accelerators this host has, found without TensorFlow (the broker never imports it).

A GPU is visible when CUDA_VISIBLE_DEVICES names it, or, with that unset, when the NVIDIA
driver lists it under /proc/driver/nvidia/gpus (``nvidia-smi -L`` as a fallback).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from tfbroker.wire.errors import ConfigError

NVIDIA_PROC_DIR = "/proc/driver/nvidia/gpus"


def visible_gpus() -> list[str]:
    """The CUDA device ids a process started now would see, in order."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        ids = [part.strip() for part in named.split(",") if part.strip()]
        # CUDA stops at the first invalid id ("-1" is the usual way to hide every GPU).
        visible = []
        for device in ids:
            if device.startswith("-"):
                break
            visible.append(device)
        return visible
    try:
        return [str(i) for i in range(len(os.listdir(NVIDIA_PROC_DIR)))]
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]
    return []


@dataclass(frozen=True, slots=True)
class Device:
    """Where one replica of each model version runs: ``gpuN`` (CUDA device N alone visible to
    it) or ``cpuN`` (no GPU visible; N tells CPU replicas apart)."""

    name: str
    cuda_visible_devices: str  # the worker's CUDA_VISIBLE_DEVICES ("" hides every GPU)

    @property
    def is_cpu(self) -> bool:
        return self.name.startswith("cpu")


CPU_ONLY = Device("cpu", "")  # the default on a host without GPUs


def resolve_devices(spec: str) -> list[Device]:
    """``--devices``: "" for every visible GPU (the CPU when there is none), or a comma list
    of ``gpuN`` / ``N`` / ``cpu`` (``cpu,cpu``: two CPU replicas). ConfigError names a bad one."""
    visible = visible_gpus()
    if not spec.strip():
        names = [f"gpu{i}" for i in visible] or ["cpu"]
    else:
        names = [part.strip().lower() for part in spec.split(",")]
    devices: list[Device] = []
    cpus = sum(name == "cpu" for name in names)
    for name in names:
        if name == "cpu":
            index = sum(d.is_cpu for d in devices)
            devices.append(Device(f"cpu{index}" if cpus > 1 else "cpu", ""))
            continue
        gpu = name.removeprefix("gpu")
        if not gpu.isdigit():
            raise ConfigError(f"--devices: {name!r} is not a device; use gpuN (a CUDA device id) or cpu")
        if gpu not in visible:
            raise ConfigError(f"--devices: gpu{gpu} is not visible here (visible GPUs: "
                             f"{', '.join(visible) or 'none'}; CUDA_VISIBLE_DEVICES and the NVIDIA driver decide)")
        devices.append(Device(f"gpu{gpu}", gpu))
    if len({d.name for d in devices}) != len(devices):
        raise ConfigError(f"--devices names a GPU twice: {spec!r} (one worker per model version per GPU)")
    return devices


def gpu_memory_mib(device_id: str) -> int | None:
    """The memory of CUDA device ``device_id`` (as CUDA_VISIBLE_DEVICES names it), in MiB, from
    nvidia-smi; None when it does not answer."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                              f"--id={device_id}"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.strip().splitlines()[:1]
    return int(first[0]) if out.returncode == 0 and first and first[0].strip().isdigit() else None
