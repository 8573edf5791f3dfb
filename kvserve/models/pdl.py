"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step (Hopper and later).

At batch 1 a decode step is a chain of ~300 kernels, most of them a few microseconds long, so
the gap between one kernel's end and the next one's first useful load is a large share of the
step. With PDL a kernel may start while the one before it in the stream is still running:

- every kernel launched this way calls `wait(PDL)` before it reads anything an earlier kernel
  may have written and before it writes anything at all. `griddepcontrol.wait` returns once the
  previous kernel has finished and its writes are visible; as every such kernel waits, the
  previous kernel had itself waited for the one before, so stream order holds for the whole
  chain, CUDA graphs included (captured as programmatic edges);
- before the wait a kernel loads only what no kernel of the step writes: weights (the GEMVs
  request their first weight tiles there, so the weight stream starts during the previous
  kernel) and the step's inputs that are copied in before its first kernel (decode attention
  reads the sequence lengths and block tables there). A kernel starts only after the one before
  it has started, so no kernel of the step starts before those copies are done. A kernel never
  exits before its wait: the next kernel's wait covers this kernel only, and it covers the
  earlier ones only because this one waited for them;
- `wait` first signals "launch dependents", so the next kernel is launched as soon as every
  program of this one is running, and its programs fill the SMs as this kernel's retire.

`KVSERVE_PDL=0` launches every kernel the ordinary way (for comparisons); other values than 0
and 1 are an error. GPUs before compute capability 9.0 have no PDL and never use it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _requested() -> bool:
    value = os.environ.get("KVSERVE_PDL", "1")
    if value not in ("0", "1"):
        raise ValueError(f"KVSERVE_PDL must be 0 or 1, got {value!r}")
    return value == "1"


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL (pass the result as the kernel's `PDL`
    constexpr and as `launch_pdl`)."""
    if device.type != "cuda" or not _requested():
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def wait(PDL: tl.constexpr):
    """Let the next kernel launch, then wait until the previous one has finished (no-op
    without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
