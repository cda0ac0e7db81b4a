"""What every benchmark record says about the machine: the CPU's name and the flags that move kernel rates
(AVX-512 VNNI, AVX2, FMA, F16C, AMX, BF16), from lscpu. Empty when lscpu is not there."""

from __future__ import annotations

import platform
import subprocess

KERNEL_FLAGS = ("avx", "fma", "f16c", "amx", "vnni", "bf16")


def cpu_facts() -> dict:
    """{"cpu": model name, "flags": sorted kernel-relevant flags}."""
    name, flags = platform.processor(), []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {"cpu": name, "flags": flags}
    for line in out.splitlines():
        if line.startswith("Flags:"):
            flags = sorted(f for f in line.split()[1:] if any(k in f for k in KERNEL_FLAGS))
        elif line.startswith("Model name:"):
            name = line.split(":", 1)[1].strip()
    return {"cpu": name, "flags": flags}
