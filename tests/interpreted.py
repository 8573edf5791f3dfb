"""Run a `tests/gpu/*_checks` module under the Triton interpreter (TRITON_INTERPRET=1) in a
subprocess: the interpreter is chosen when a kernel is defined, so it needs a fresh process. And
run a `tests/gpu/*_sass` module (kernels compiled for sm_90 with Triton's bundled CUDA tools, no
GPU) the same way, without the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_interpreted(module: str, done: str = "interpret checks passed", timeout: int = 600,
                    skip_unsupported: bool = False) -> None:
    """`python -m tests.gpu.<module>` with TRITON_INTERPRET=1 must exit 0 and print `done`."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-m", f"tests.gpu.{module}"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if skip_unsupported and r.returncode != 0 and "interpret" in r.stderr and "not supported" in r.stderr:
        pytest.skip("this Triton's interpreter cannot run the kernels")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert done in r.stdout


def run_sass_check(module: str, done: str, timeout: int = 600, args: tuple[str, ...] = ()) -> None:
    """`python -m tests.gpu.<module> [args]` compiled for sm_90 (TRITON_INTERPRET unset) must exit 0
    and print `done`; skipped where triton ships without its CUDA tools."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
        pytest.skip("triton without its bundled CUDA tools")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", f"tests.gpu.{module}", *args], cwd=root, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and done in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
