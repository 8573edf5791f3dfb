"""Building kvserve's C kernels: compile once per source/flag set into a cache, atomically.

Both kernel libraries (`models/cpu_kernels.py`, the bf16 ones; `kernels/cpu_quant.py`, the GGML
block formats) are compiled on first use with the system C compiler (`$CC`, else `cc` / `gcc`)
into `$KVSERVE_CACHE_DIR` (default `~/.cache/kvserve`), under a name that hashes the sources and
flags, and loaded with ctypes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("KVSERVE_CACHE_DIR") or Path.home() / ".cache" / "kvserve")


def library_path(prefix: str, files: list[Path], flags: list[str]) -> Path:
    """Where the library of these files (sources and headers) built with `flags` lives."""
    blob = b"".join(p.read_bytes() for p in files) + " ".join(flags).encode()
    return cache_dir() / f"{prefix}-{hashlib.sha256(blob).hexdigest()[:16]}.so"


def build(out: Path, sources: list[Path], flags: list[str], timeout: float = 300) -> None:
    """Compile `sources` with `flags` into the shared library `out`. Raises RuntimeError (no
    compiler, or the compiler's error) or subprocess.SubprocessError (time-out)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name, then rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *flags, *map(str, sources), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
