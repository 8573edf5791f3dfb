"""benchmarks/tp_bench.py's profile accounting: overlapping kernels (programmatic dependent
launch) are split into exclusive times that add up to the busy timeline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[2] / "benchmarks" / "tp_bench.py"


@pytest.fixture(scope="module")
def tp_bench():
    spec = importlib.util.spec_from_file_location("tp_bench_under_test", _PATH)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(_PATH.parent))  # its `import gpu_bench` fallback
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(_PATH.parent))
    return module


def test_serial_kernels_with_gaps(tp_bench):
    split = tp_bench.split_timeline([(10, 15, "b"), (0, 4, "a"), (20, 80, "c"), (140, 141, "a")])
    assert split["total"] == {"a": 5, "b": 5, "c": 60}
    assert split["exclusive"] == split["total"]  # nothing overlaps
    assert split["busy"] == 70
    assert split["idle"] == {"<3us": 0, "3-10us": 5 + 6, "10-50us": 0, ">=50us": 60}
    assert split["idle_gaps"] == {"<3us": 0, "3-10us": 2, "10-50us": 0, ">=50us": 1}


def test_overlapping_kernels_split_the_busy_time(tp_bench):
    # "gemv" starts (PDL) while "norm" runs and waits for it; "tiny" lies inside "gemv".
    kernels = [(0, 10, "norm"), (4, 30, "gemv"), (12, 14, "tiny"), (31, 33, "norm")]
    split = tp_bench.split_timeline(kernels)
    assert split["total"] == {"norm": 12, "gemv": 26, "tiny": 2}
    assert split["exclusive"] == {"norm": 12, "gemv": 20, "tiny": 0}
    assert split["busy"] == 32 == 33 - 0 - 1  # the span minus the one 1 µs gap
    assert split["idle"]["<3us"] == 1 and sum(split["idle_gaps"].values()) == 1


def test_empty(tp_bench):
    split = tp_bench.split_timeline([])
    assert split["busy"] == 0 and split["total"] == {} and sum(split["idle"].values()) == 0
