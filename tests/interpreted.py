"""Run a `tests/gpu/*_checks` module under the Triton interpreter (TRITON_INTERPRET=1) in a
subprocess: the interpreter is chosen when a kernel is defined, so it needs a fresh process."""

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
