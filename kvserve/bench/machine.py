"""What a benchmark ran on: CPU, cores, GPU and driver, library versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def gpu_info() -> dict[str, str] | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        info = {"name": torch.cuda.get_device_name(0), "count": str(torch.cuda.device_count()),
                "cuda": str(torch.version.cuda)}
    except Exception:  # noqa: BLE001 - a broken CUDA install must not break the report
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        info["driver"] = "?"
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("kvserve", "torch", "transformers", "llama-cpp-python"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_info() -> dict:
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads, "gpu": gpu_info(),
        "platform": platform.platform(), "load_avg_at_start": load, "versions": versions(), "commit": git_commit(),
    }


def describe(m: dict) -> str:
    gpu = m.get("gpu")
    g = f", GPU {gpu['name']} x{gpu['count']} (driver {gpu['driver']}, CUDA {gpu['cuda']})" if gpu else ", no GPU"
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
    return f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads){g}; {v}; commit {m['commit']}"


class LoadMonitor:
    """The highest 1-minute load average seen while a benchmark runs (sampled every `every_s`
    seconds on a daemon thread, and at start and stop)."""

    def __init__(self, every_s: float = 2.0) -> None:
        import threading

        self._every = every_s
        self._stop = threading.Event()
        self.peak: float | None = _load()
        self._thread = threading.Thread(target=self._run, name="kvserve-load-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._sample()

    def _sample(self) -> None:
        load = _load()
        if load is not None and (self.peak is None or load > self.peak):
            self.peak = load

    def stop(self) -> float | None:
        self._stop.set()
        self._sample()
        return self.peak


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not POSIX
        return None
