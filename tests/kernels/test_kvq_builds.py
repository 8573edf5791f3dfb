"""The quantized kernels built for other CPUs: ARM64 (plain C, NEON, NEON dotprod) with a cross
compiler, run under qemu, and x86-64 AVX2, against the x86-64 plain-C build on the same blocks.
Dequantization must be bit-identical everywhere; products may differ only in float summation
order. Skipped without `aarch64-linux-gnu-gcc` and `qemu-aarch64` (`.ci/run` installs them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kvserve.kernels.cpu_quant import QUANT_DIR
from kvserve.platform.cpuinfo import cpu_info

HARNESS = Path(__file__).with_name("kvq_harness.c")
FLAGS = ["-O2", "-fopenmp", "-ffp-contract=off", f"-I{QUANT_DIR}"]


def _build(cc: str, flags: list[str], out: Path) -> Path:
    cmd = [cc, *FLAGS, *flags, str(HARNESS), *map(str, sorted(QUANT_DIR.glob("*.c"))), "-o", str(out), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _run(cmd: list[str]) -> dict[str, np.ndarray]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=True).stdout
    return {" ".join(line.split()[:2]): np.array([float(v) for v in line.split()[2:]]) for line in text.splitlines()}


def _compare(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert got.keys() == ref.keys() and len(ref) == 6 * 4
    for key, want in ref.items():
        if "deq" in key:
            assert np.array_equal(got[key], want), key
        else:  # summation order only: relative to each output's size
            assert np.all(np.abs(got[key] - want) <= 2e-3 * (np.abs(want) + 1e-2)), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or not cpu_info().is_x86:
        pytest.skip("needs an x86-64 C compiler")
    return _run([str(_build(cc, ["-DKVQ_SCALAR"], tmp_path_factory.mktemp("kvq") / "scalar"))])


def test_x86_avx2_build_matches_plain_c(reference, tmp_path):
    if "avx2" not in cpu_info().levels():
        pytest.skip("no AVX2 on this CPU")
    exe = _build(shutil.which("cc") or "gcc", ["-mavx2", "-mfma", "-mf16c"], tmp_path / "avx2")
    _compare(_run([str(exe)]), reference)


@pytest.mark.parametrize("flags", [["-DKVQ_SCALAR"], ["-march=armv8-a"], ["-march=armv8.2-a+dotprod"]],
                         ids=["plain-c", "neon", "neon-dotprod"])
def test_arm64_builds_match_x86(reference, tmp_path, flags):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        pytest.skip("no aarch64 cross compiler or qemu-aarch64")
    exe = _build(cc, ["-static", *flags], tmp_path / "arm")
    _compare(_run([qemu, str(exe)]), reference)
