"""runner/cpu_memory.py: malloc is tuned once on glibc CPU engines, and the opt-outs hold."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

_PROBE = "from kvserve.runner import cpu_memory as m; print(m.tune_malloc(), m.tune_malloc())"


def _run(env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") and k.endswith("_"))}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_tuned_once():
    assert _run({}) == "True True"


def test_opt_outs():
    assert _run({"KVSERVE_TUNE_MALLOC": "0"}) == "False False"
    assert _run({"MALLOC_MMAP_THRESHOLD_": "131072"}) == "False False"  # the user's own settings win


def test_cpu_engine_tunes_malloc(tiny_llama, monkeypatch):
    import os

    from kvserve import LLM
    from kvserve.runner import cpu_memory

    if os.environ.get("KVSERVE_TUNE_MALLOC") == "0" or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        pytest.skip("malloc tuning opted out in this environment")
    calls = []
    monkeypatch.setattr(cpu_memory, "_done", False)
    real = cpu_memory.tune_malloc
    monkeypatch.setattr(cpu_memory, "tune_malloc", lambda: calls.append(1) or real())  # called by the CPU platform
    LLM(str(tiny_llama[0]), dtype="float32", device="cpu", num_kv_blocks=16)
    assert calls and cpu_memory._done
