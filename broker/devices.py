"""Which accelerators this host has, found without TensorFlow (the broker never imports it).

A GPU is visible when CUDA_VISIBLE_DEVICES names it, or, with that unset, when the NVIDIA
driver lists it under /proc/driver/nvidia/gpus (``nvidia-smi -L`` as a fallback).
"""

from __future__ import annotations

import os
import shutil
import subprocess

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
