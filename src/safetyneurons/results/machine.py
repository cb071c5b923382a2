"""Where a figure was made: the machine (CPU model, threads, GPU card) and the code version (git commit).

A run records both in its ``run.json`` (``machine``, ``code_version``); benchmark JSON carries the same fields.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

NOT_RECORDED = "not recorded"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict:
    """``{"cpu", "threads", "gpu"}``: CPU model, torch's intra-op threads, the first CUDA card's name or None.
    Reads torch only when it is already imported (a run has it); otherwise threads and gpu are None."""
    torch = sys.modules.get("torch")
    threads, gpu = None, None
    if torch is not None:
        threads = int(torch.get_num_threads())
        try:
            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except (RuntimeError, AssertionError):
            gpu = None
    return {"cpu": cpu_model(), "threads": threads, "gpu": gpu}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> str:
    """``git rev-parse --short HEAD`` of the checkout the package runs from, ``+dirty`` when tracked files
    differ from it; installed outside a checkout: ``safetyneurons <version>``."""
    root = Path(__file__).resolve().parents[3]
    head = _git(root, "rev-parse", "--short", "HEAD") if (root / ".git").exists() else None
    if head is None:
        try:
            return f"safetyneurons {metadata.version('safetyneurons')}"
        except metadata.PackageNotFoundError:
            return "unknown"
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if dirty else "")


def provenance() -> dict:
    """What a run records about where it ran: ``{"code_version", "machine"}``."""
    return {"code_version": code_version(), "machine": machine_info()}


def describe_machine(machine: dict | None) -> str:
    """One phrase for a recorded machine: ``<cpu>, <n> threads, GPU <card>`` (or ``no GPU``)."""
    if not isinstance(machine, dict) or not machine:
        return f"machine: {NOT_RECORDED}"
    threads = machine.get("threads")
    gpu = machine.get("gpu")
    return (f"{machine.get('cpu') or 'unknown CPU'}, "
            f"{'? threads' if threads is None else f'{threads} threads'}, "
            f"{'GPU ' + str(gpu) if gpu else 'no GPU'}")
