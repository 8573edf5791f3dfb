"""What the CPU can do: the instruction sets kvserve's CPU paths depend on, read once.

x86-64 paths come in levels, each a superset of the one before:

    baseline      plain C and PyTorch (any x86-64, any ARM64)
    avx2          AVX2 + FMA + F16C: int8 dot products for the GGML block formats
    avx512        AVX-512 F/BW/VL (+ VNNI where present): wider int8 dot products
    avx512_bf16   + AVX512-BF16: bf16 is native (bf16 C kernels, bf16 by default)

ARM64 has `baseline`, `neon` and `dotprod` (NEON's int8 dot product). `KVSERVE_CPU_ISA`
caps the level (`baseline`, `avx2`, `avx512`, `avx512_bf16`, `neon`, `dotprod`, or `native`,
the default: the best the CPU has), so any machine can run, and test, a lower level's path;
asking for a level the CPU lacks is a ValueError naming the variable.
"""

from __future__ import annotations

import os
import platform as _platform
from dataclasses import dataclass
from functools import lru_cache

X86_LEVELS = ("baseline", "avx2", "avx512", "avx512_bf16")
ARM_LEVELS = ("baseline", "neon", "dotprod")
ISA_ENV = "KVSERVE_CPU_ISA"

# Flags worth naming in the start-up line, in the order they are printed.
_REPORTED = (
    "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "amx_bf16", "amx_int8", "asimd", "asimddp", "bf16", "i8mm", "sve",
)


@dataclass(frozen=True)
class CpuInfo:
    arch: str  # "x86_64", "aarch64", or what platform.machine() says
    model: str
    flags: frozenset[str]

    def has(self, *names: str) -> bool:
        return all(n in self.flags for n in names)

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "amd64", "AMD64")

    @property
    def is_arm(self) -> bool:
        return self.arch in ("aarch64", "arm64")

    def levels(self) -> tuple[str, ...]:
        """The levels this CPU supports, lowest first."""
        if self.is_x86:
            out = ["baseline"]
            if self.has("avx2", "fma", "f16c"):
                out.append("avx2")
                if self.has("avx512f", "avx512bw", "avx512vl"):
                    out.append("avx512")
                    if self.has("avx512_bf16"):
                        out.append("avx512_bf16")
            return tuple(out)
        if self.is_arm:
            out = ["baseline"]
            if self.has("asimd"):
                out.append("neon")
                if self.has("asimddp"):
                    out.append("dotprod")
            return tuple(out)
        return ("baseline",)

    def reported_flags(self) -> list[str]:
        return [f for f in _REPORTED if f in self.flags]


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "CPU part") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, frozenset(flags)


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU (read once: it does not change while the process runs)."""
    model, flags = _read_cpuinfo()
    arch = _platform.machine()
    if arch in ("arm64", "aarch64") and not flags and _platform.system() == "Darwin":
        flags = frozenset({"asimd", "asimddp"})  # every Apple silicon core has both
    return CpuInfo(arch=arch, model=model or _platform.processor() or arch, flags=flags)


def isa_level(info: CpuInfo | None = None, requested: str | None = None) -> str:
    """The level kvserve's CPU paths use: the best the CPU has, capped by `KVSERVE_CPU_ISA`
    (or `requested`). Read on every call, so tests can change the variable."""
    info = info or cpu_info()
    have = info.levels()
    want = (requested if requested is not None else os.environ.get(ISA_ENV, "native")).strip().lower()
    if want in ("", "native"):
        return have[-1]
    known = X86_LEVELS if info.is_x86 else ARM_LEVELS if info.is_arm else ("baseline",)
    if want not in known:
        raise ValueError(f"{ISA_ENV}={want!r} is not a level of this {info.arch} CPU; use one of {['native', *known]}")
    if want not in have:
        raise ValueError(
            f"{ISA_ENV}={want!r}: this CPU ({info.model}) lacks it; it supports {list(have)}"
        )
    return want


def at_least(level: str, minimum: str, info: CpuInfo | None = None) -> bool:
    """True when `level` is `minimum` or above on this CPU's ladder."""
    info = info or cpu_info()
    ladder = X86_LEVELS if info.is_x86 else ARM_LEVELS if info.is_arm else ("baseline",)
    if minimum not in ladder:
        return False
    return ladder.index(level) >= ladder.index(minimum)
