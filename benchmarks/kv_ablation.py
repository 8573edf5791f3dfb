"""The KV-cache ablation; the logic lives in `kvserve.bench.kv_ablation` (`kvserve bench kv-ablation`).

    python benchmarks/kv_ablation.py --dtype float32 --out /tmp/ablation.png
"""

from __future__ import annotations

import sys

from kvserve.bench.kv_ablation import main

if __name__ == "__main__":
    sys.exit(main())
