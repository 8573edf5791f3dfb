#!/bin/bash
# One device call that checks the GPU paths of several issues, each bounded in time (the lead's
# batch when device time is short). Run from the repository root on the GPU machine.
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 110 python -m benchmarks.gpu_quant_bench --only gemv 2>&1 | grep "^|\|Error\|error" | head -40
timeout 70 python -m pytest -q -x tests/gpu/test_quant_gpu.py -k "products_bf16 or epilogues" 2>&1 | tail -3
timeout 45 python -m pytest -q tests/gpu/test_fused_moe.py 2>&1 | tail -3
timeout 45 python -m pytest -q tests/gpu/test_spec_decode_gpu.py 2>&1 | tail -3
