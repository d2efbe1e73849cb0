"""Training metrics: smoothed loss, throughput, MFU, data-wait fraction, peak RSS, JSONL output.

MFU = achieved FLOP/s / peak FLOP/s of the worker's device. GPU peaks come from a table (dense
bf16 / fp32 tensor-core numbers from vendor data sheets); on CPU there is no data sheet, so the
peak is *measured* once per process with a large matmul in the training dtype (documented as such:
it is the achievable matmul rate, so CPU "MFU" reads as "fraction of matmul speed").
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

# (substring of torch.cuda.get_device_name(), bf16 dense FLOP/s, fp32/tf32 dense FLOP/s)
GPU_PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A10G", 70e12, 35e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 83e12),
    ("RTX 3090", 71e12, 36e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]

_MEASURED: dict[str, float] = {}


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 8, fresh: bool = False
) -> float:
    """Achievable matmul FLOP/s on ``device`` in ``dtype`` (cached per process; ``fresh`` measures
    again and keeps the higher figure)."""
    key = f"{device}-{dtype}-{n}"
    if fresh or key not in _MEASURED:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm up
        best = float("inf")  # the fastest of several single matmuls: robust to other processes' bursts
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        _MEASURED[key] = max(_MEASURED.get(key, 0.0), 2 * n**3 / best)
    return _MEASURED[key]


def cpu_bf16_speedup(n: int = 512) -> float:
    """How many times faster a bf16 matmul runs than an fp32 one on this CPU (>1: native bf16 units)."""
    cpu = torch.device("cpu")
    return measure_matmul_flops(cpu, torch.bfloat16, n=n) / measure_matmul_flops(cpu, torch.float32, n=n)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``getrusage``; 0.0 where it is unavailable)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s of one worker's device and where the number came from (``table`` or ``measured``)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bf16, fp32 in GPU_PEAK_FLOPS:
            if key in name:
                return (bf16 if dtype == torch.bfloat16 else fp32), "table"
    return measure_matmul_flops(device, dtype), "measured"


class EMA:
    """Debiased exponential moving average (nanochat logs the train loss this way, beta 0.9)."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.value, self.count = beta, 0.0, 0

    def update(self, x: float) -> float:
        self.count += 1
        self.value = self.beta * self.value + (1 - self.beta) * x
        return self.get()

    def get(self) -> float:
        return self.value / (1 - self.beta**self.count) if self.count else float("nan")

    def state(self) -> dict[str, float]:
        return {"value": self.value, "count": self.count}

    def load(self, state: dict[str, float]) -> None:
        self.value, self.count = float(state["value"]), int(state["count"])


class Throughput:
    """Wall time split into data waiting vs everything else, between two ``window()`` calls.

    ``window()`` also gives ``cpu_cores``: this process's CPU seconds (every thread) per wall second
    over the window. A CPU worker with ``n`` torch threads that gets the cores it asked for reads
    close to ``n``; less means other processes on the node (Ray's own, data actors) took the rest.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.data_wait = 0.0
        self.tokens = 0

    def add_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def window(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"elapsed": elapsed, "tok_per_sec": self.tokens / elapsed, "data_wait_frac": self.data_wait / elapsed,
               "cpu_cores": (time.process_time() - self.cpu_start) / elapsed}
        self.reset()
        return out


class JsonlWriter:
    """Append one JSON object per line (flushed each time, so a crash loses nothing written)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return str(x)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def read_last_metrics(path: str | Path) -> dict[str, Any]:
    """The last value of every metric in a metrics.jsonl (later records win; ``samples`` left out)."""
    merged: dict[str, Any] = {}
    for record in read_jsonl(path):
        merged.update({k: v for k, v in record.items() if k != "samples"})
    return merged


def format_log_line(m: dict[str, Any]) -> str:
    """The concise driver line: ``base step 40/150 | loss 5.123 | lr 1.00 | 12.3K tok/s | mfu 3.1% | wait 2%``."""
    parts = [f"{m.get('stage', '?')} step {m.get('step')}/{m.get('num_iterations', '?')}"]
    if "train/loss" in m:
        parts.append(f"loss {m['train/loss']:.4f}")
    if "train/lr_mult" in m:
        parts.append(f"lr {m['train/lr_mult']:.2f}")
    if "train/tok_per_sec" in m:
        parts.append(f"{m['train/tok_per_sec'] / 1e3:.1f}K tok/s")
    if "train/mfu" in m:
        parts.append(f"mfu {100 * m['train/mfu']:.1f}%")
    if "train/data_wait_frac" in m:
        parts.append(f"wait {100 * m['train/data_wait_frac']:.0f}%")
    for key in ("val/bpb", "val/loss"):
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    return " | ".join(parts)
