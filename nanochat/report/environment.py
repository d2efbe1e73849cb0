"""Where a report was generated: code version (read from ``.git`` directly), hardware, library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from nanochat.report.markdown import MISSING

# Hourly price per GPU (USD) for the cost estimate, as in nanochat's report.
GPU_HOURLY_USD = {"H100": 3.00, "A100": 1.79, "V100": 0.55}


def git_info(start: Path | None = None) -> dict[str, str]:
    """Branch and commit of the source checkout, read from ``.git`` directly (no git binary needed)."""
    here = (start or Path(__file__)).resolve()
    for directory in [here, *here.parents]:
        git = directory / ".git"
        if git.is_file():  # a worktree: "gitdir: <path>"
            text = git.read_text().strip()
            if text.startswith("gitdir:"):
                git = (directory / text.split(":", 1)[1].strip()).resolve()
        if (git / "HEAD").is_file():
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return {"branch": "(detached)", "commit": head[:12]}
            ref = head.split(":", 1)[1].strip()
            commit = _resolve_ref(git, ref)
            return {"branch": ref.removeprefix("refs/heads/"), "commit": commit[:12] if commit else MISSING}
    return {"branch": MISSING, "commit": MISSING}


def _resolve_ref(git: Path, ref: str) -> str | None:
    loose = git / ref
    if loose.is_file():
        return loose.read_text().strip()
    packed = git / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0]
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_info() -> dict[str, Any]:
    """Where the report was generated: code version, hardware, library versions."""
    info: dict[str, Any] = {**{f"git {k}": v for k, v in git_info().items()}}
    info["platform"] = platform.platform()
    info["python"] = platform.python_version()
    info["CPUs"] = os.cpu_count()
    try:
        info["RAM"] = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        info["RAM"] = MISSING
    gpus = _gpus()
    info["GPUs"] = f"{len(gpus)} x {gpus[0]['name']} ({gpus[0]['memory_gib']:.0f} GiB)" if gpus else "none"
    for package in ("torch", "ray", "deepspeed", "nanochat"):
        info[package] = _version(package)
    if gpus:
        rate = next((v for k, v in GPU_HOURLY_USD.items() if k in gpus[0]["name"]), 2.00)
        info["hourly cost estimate"] = f"${rate * len(gpus):.2f}/h ({len(gpus)} GPUs at ${rate:.2f})"
    return info


def _gpus() -> list[dict[str, Any]]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [
            {"name": torch.cuda.get_device_name(i),
             "memory_gib": torch.cuda.get_device_properties(i).total_memory / 2**30}
            for i in range(torch.cuda.device_count())
        ]
    except Exception:  # noqa: BLE001 - a broken driver must not stop the report
        return []
